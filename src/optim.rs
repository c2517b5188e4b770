//! Optimizers. A step updates every parameter (and its state) in place on
//! the device, in one generated kernel per group of parameters: the kernel
//! covers the parameters' elements end to end and picks each element's
//! buffers with a `switch`, so a model with a handful of tensors is one
//! dispatch per step instead of a few per parameter per term. Groups are
//! only as large as the device's storage-binding limit allows, counting
//! buffers: tensors in one arena share one binding.
//!
//! Parameters are updated in place: handles to a parameter see its new
//! value, as in PyTorch.

use std::fmt::Write;
use std::sync::Arc;

use parking_lot::Mutex;

use crate::error::{Error, Result};
use crate::exec::bind::{Binds, Operand};
use crate::metadata::DType;
use crate::profile::KernelInfo;
use crate::tensor::Tensor;

/// The most parameters one update kernel covers (its `switch` grows with them).
const MAX_GROUP: usize = 32;

/// The update rule of an optimizer.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Rule {
    /// `buf = momentum buf + g; p -= lr buf` (g includes weight decay).
    Sgd { lr: f64, momentum: f64, weight_decay: f64 },
    /// Adam (`decoupled: false`, L2 in the gradient) or AdamW (decoupled decay).
    Adam { lr: f64, betas: (f64, f64), eps: f64, weight_decay: f64, decoupled: bool },
}

impl Rule {
    /// The optimizer's name, for the profiler.
    fn name(&self) -> &'static str {
        match self {
            Rule::Sgd { .. } => "sgd",
            Rule::Adam { decoupled: false, .. } => "adam",
            Rule::Adam { decoupled: true, .. } => "adamw",
        }
    }

    /// PyTorch's checks of the hyper-parameters: a NaN, infinite or
    /// negative one would silently wreck every parameter on the first step.
    fn validate(&self, op: &'static str) -> Result<()> {
        let mut checks: Vec<(&str, f64, bool)> = Vec::new();
        let non_negative = |v: f64| v.is_finite() && v >= 0.0;
        match *self {
            Rule::Sgd { lr, momentum, weight_decay } => {
                checks.push(("learning rate", lr, non_negative(lr)));
                checks.push(("momentum", momentum, non_negative(momentum)));
                checks.push(("weight decay", weight_decay, non_negative(weight_decay)));
            }
            Rule::Adam { lr, betas, eps, weight_decay, .. } => {
                let beta = |b: f64| (0.0..1.0).contains(&b);
                checks.push(("learning rate", lr, non_negative(lr)));
                checks.push(("beta1", betas.0, beta(betas.0)));
                checks.push(("beta2", betas.1, beta(betas.1)));
                checks.push(("eps", eps, non_negative(eps)));
                checks.push(("weight decay", weight_decay, non_negative(weight_decay)));
            }
        }
        match checks.into_iter().find(|&(_, _, ok)| !ok) {
            None => Ok(()),
            Some((name, value, _)) => Err(Error::InvalidArgument {
                op,
                message: format!(
                    "invalid {name} {value}: {}",
                    if name.starts_with("beta") { "betas must be in [0, 1)" } else { "it must be finite and >= 0" }
                ),
            }),
        }
    }

    /// Per-parameter state buffers (momentum; first and second moments).
    fn state_count(&self) -> usize {
        match self {
            Rule::Sgd { momentum, .. } if *momentum == 0.0 => 0,
            Rule::Sgd { .. } => 1,
            Rule::Adam { .. } => 2,
        }
    }

    /// The rule's constants (uniform words 4..).
    fn scalars(&self) -> Vec<f32> {
        match *self {
            Rule::Sgd { lr, momentum, weight_decay } => vec![lr as f32, momentum as f32, weight_decay as f32],
            Rule::Adam { lr, betas: (b1, b2), eps, weight_decay, .. } => {
                vec![lr as f32, b1 as f32, b2 as f32, eps as f32, weight_decay as f32]
            }
        }
    }

    /// Adam's bias corrections `1 - b1^t` and `sqrt(1 - b2^t)` for a
    /// parameter's `t`-th step (1-based), computed on the host; steps count
    /// per parameter, as in PyTorch.
    fn corrections(&self, t: u64) -> [f32; 2] {
        match *self {
            Rule::Sgd { .. } => [1.0, 1.0],
            Rule::Adam { betas: (b1, b2), .. } => {
                let t = t.min(i32::MAX as u64) as i32;
                [(1.0 - b1.powi(t)) as f32, (1.0 - b2.powi(t)).sqrt() as f32]
            }
        }
    }

    /// WGSL statements updating element `j` of parameter `k`, whose
    /// operands are named by `at(role)` (role 0 the parameter, 1 its
    /// gradient, 2.. its states).
    fn statements(&self, at: impl Fn(usize) -> String) -> String {
        // States the rule does not have are never named.
        let state = |st: usize| if st < self.state_count() { at(2 + st) } else { String::new() };
        let (p, g, s0, s1) = (at(0), at(1), state(0), state(1));
        match *self {
            Rule::Sgd { momentum, .. } => {
                let mut s = format!("let g = {g} + c(2u) * {p};\n");
                if momentum != 0.0 {
                    let _ = writeln!(s, "let b = c(1u) * {s0} + g; {s0} = b;");
                    let _ = writeln!(s, "{p} = {p} - c(0u) * b;");
                } else {
                    let _ = writeln!(s, "{p} = {p} - c(0u) * g;");
                }
                s
            }
            Rule::Adam { decoupled, .. } => {
                let mut s = String::new();
                if decoupled {
                    let _ = writeln!(s, "let g = {g};\n{p} = {p} * (1.0 - c(0u) * c(4u));");
                } else {
                    let _ = writeln!(s, "let g = {g} + c(4u) * {p};");
                }
                let _ = writeln!(s, "let m = c(1u) * {s0} + (1.0 - c(1u)) * g; {s0} = m;");
                let _ = writeln!(s, "let v = c(2u) * {s1} + (1.0 - c(2u)) * g * g; {s1} = v;");
                let _ = writeln!(s, "{p} = {p} - c(0u) * (m / bc(k, 0u)) / (sqrt(v) / bc(k, 1u) + c(3u));");
                s
            }
        }
    }

    /// Operands per parameter: the parameter, its gradient, its states.
    fn operands_per_param(&self) -> usize {
        2 + self.state_count()
    }

    /// Which operands of a group of `n` parameters the kernel writes.
    fn written(&self, n: usize) -> Vec<bool> {
        let one: Vec<bool> = (0..self.operands_per_param()).map(|o| o != 1).collect();
        one.iter().copied().cycle().take(n * one.len()).collect()
    }

    /// The update kernel for `n` parameters whose operands are bound as
    /// `binds`. Uniform: element count, the rule's scalars (from word 4),
    /// each parameter's first element in the concatenation and the total
    /// (from word 12), two bias corrections per parameter, then each
    /// operand's element offset in its buffer (from word 13 + 3n).
    fn source(&self, n: usize, binds: &Binds) -> String {
        let per = self.operands_per_param();
        let words = (13 + 3 * n + per * n).div_ceil(4);
        let mut s = format!("struct Params {{ v: array<vec4<u32>, {words}> }}\nconst N: u32 = {n}u;\n");
        s.push_str("@group(0) @binding(0) var<uniform> params: Params;\n");
        for (b, &(_, written)) in binds.bindings.iter().enumerate() {
            let access = if written { "read_write" } else { "read" };
            let _ = writeln!(s, "@group(0) @binding({}) var<storage, {access}> b{b}: array<f32>;", b + 1);
        }
        s.push_str(
            "fn w(i: u32) -> u32 { return params.v[i / 4u][i % 4u]; }\n\
             fn base(o: u32) -> u32 { return w(13u + 3u * N + o); }\n\
             fn c(i: u32) -> f32 { return bitcast<f32>(w(4u + i)); }\n\
             fn bc(k: u32, i: u32) -> f32 { return bitcast<f32>(w(13u + N + 2u * k + i)); }\n\
             @compute @workgroup_size(256)\n\
             fn main(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {\n\
             \x20   let i = gid.x + gid.y * nwg.x * 256u;\n\
             \x20   if (i >= w(0u)) { return; }\n\
             \x20   var k = 0u;\n",
        );
        let _ = writeln!(s, "    for (var q = 1u; q < {n}u; q = q + 1u) {{ if (i >= w(12u + q)) {{ k = q; }} }}");
        s.push_str("    let j = i - w(12u + k);\n");
        let indent = |body: String, pad: &str| body.lines().map(|l| format!("{pad}{l}\n")).collect::<String>();
        // When each role's operands (all parameters, all gradients, ...)
        // share one binding, as in an arena, the parameters differ only in
        // their offset words: one body indexes them by `k`. Otherwise each
        // parameter's operands have bindings of their own, chosen by a
        // `switch` (a branch per element, measured 2x slower on lavapipe).
        let shared = (0..per).all(|r| (0..n).all(|k| binds.slot[k * per + r] == binds.slot[r]));
        if shared {
            let at = |r: usize| format!("b{}[base(k * {per}u + {r}u) + j]", binds.slot[r]);
            s.push_str(&indent(self.statements(at), "    "));
            s.push_str("}\n");
            return s;
        }
        s.push_str("    switch k {\n");
        for k in 0..n {
            let at = |r: usize| format!("b{}[base({}u) + j]", binds.slot[k * per + r], k * per + r);
            let _ = writeln!(s, "        case {k}u: {{\n{}        }}", indent(self.statements(at), "            "));
        }
        s.push_str("        default: {}\n    }\n}\n");
        s
    }
}

/// Shared state of the optimizers: parameters, per-parameter state
/// buffers, and the host state (rule, step counts) a compiled step reads
/// at every call.
struct Core {
    params: Vec<Tensor>,
    state: Vec<Vec<Tensor>>,
    host: Arc<Mutex<Host>>,
}

/// What the host keeps of an optimizer: shared with the compiled steps that
/// update its parameters, which read the learning rate and step counts at
/// every call (so `set_lr` needs no re-trace).
struct Host {
    rule: Rule,
    /// Updates so far, per parameter.
    steps: Vec<u64>,
}

impl Core {
    fn new(op: &'static str, params: &[Tensor], rule: Rule) -> Result<Core> {
        rule.validate(op)?;
        let Some(first) = params.first() else {
            return Err(Error::InvalidArgument { op, message: "needs at least one parameter".into() });
        };
        for (i, p) in params.iter().enumerate() {
            if !p.is_leaf() || !p.needs_grad() {
                return Err(Error::InvalidArgument {
                    op,
                    message: format!("parameter {i} must be a leaf that requires grad (`.requires_grad(true)`)"),
                });
            }
            if p.dtype() != DType::F32 {
                return Err(Error::UnsupportedDType { op, dtype: p.dtype(), hint: "optimizers update f32 parameters" });
            }
            if !p.is_contiguous() || p.layout().offset != 0 {
                return Err(Error::InvalidArgument {
                    op,
                    message: format!("parameter {i} is a view; optimize a tensor that owns its data (`.contiguous()`)"),
                });
            }
            if p.device() != first.device() {
                return Err(Error::DeviceMismatch { op, lhs: first.device().id(), rhs: p.device().id() });
            }
            // Updated in place, two parameters on one buffer would each be
            // updated from stale values (and bound twice for writing).
            if let Some(j) = params[..i].iter().position(|q| q.shares_storage(p)) {
                return Err(Error::InvalidArgument {
                    op,
                    message: format!(
                        "parameters {j} and {i} share one buffer (the same tensor listed twice, or two handles \
                         to one storage); list each parameter once"
                    ),
                });
            }
        }
        let state = params
            .iter()
            .map(|p| (0..rule.state_count()).map(|_| p.zeros_like()).collect::<Result<Vec<_>>>())
            .collect::<Result<Vec<_>>>()?;
        let host = Arc::new(Mutex::new(Host { rule, steps: vec![0; params.len()] }));
        Ok(Core { params: params.to_vec(), state, host })
    }

    fn lr(&self) -> f64 {
        match self.host.lock().rule {
            Rule::Sgd { lr, .. } | Rule::Adam { lr, .. } => lr,
        }
    }

    fn set_lr(&mut self, op: &'static str, new: f64) -> Result<()> {
        // Inside a compiled step this would happen once, when tracing; a
        // replay reads the rate at every call, so it belongs between calls.
        crate::compiler::trace::graph_break(op, "the learning rate is set between calls of a compiled step")?;
        let mut host = self.host.lock();
        let mut rule = host.rule;
        match &mut rule {
            Rule::Sgd { lr, .. } | Rule::Adam { lr, .. } => *lr = new,
        }
        rule.validate(op)?;
        host.rule = rule;
        Ok(())
    }

    /// The update as traced tensor ops, inside a compiled step: the same
    /// arithmetic as the kernel's, in the same order, with the rule's
    /// scalars and the bias corrections read from a host input computed at
    /// every call, and the new parameters and states written back in place
    /// when the program runs. The step counts advance when it is recorded.
    fn traced_step(&self) -> Result<()> {
        let work: Vec<(usize, Tensor)> =
            self.params.iter().enumerate().filter_map(|(i, p)| p.grad().map(|g| (i, g))).collect();
        if work.is_empty() {
            return Ok(());
        }
        let _no_grad = crate::no_grad();
        let before = crate::compiler::trace::set_phase(crate::compiler::Phase::Optimizer);
        let result = self.traced_update(work);
        crate::compiler::trace::set_phase(before);
        result
    }

    fn traced_update(&self, work: Vec<(usize, Tensor)>) -> Result<()> {
        let ids: Vec<usize> = work.iter().map(|(i, _)| *i).collect();
        // The `k`-th update of this optimizer in the step: its counts are
        // then `k` ahead of what the host holds (they advance on commit).
        let ahead = crate::compiler::trace::uses_of(Arc::as_ptr(&self.host) as usize);
        let (host, which) = (self.host.clone(), ids.clone());
        let values = crate::compiler::trace::host_input(
            Box::new(move |_: &[Tensor]| {
                let h = host.lock();
                let mut v = h.rule.scalars();
                for &i in &which {
                    v.extend(h.rule.corrections(h.steps[i] + 1 + ahead));
                }
                Ok(v.into_iter().map(f32::to_bits).collect())
            }),
            DType::F32,
            self.params[0].device(),
        )?;
        let rule = self.host.lock().rule;
        let n_scalars = rule.scalars().len();
        // Each scalar as a 0-d tensor: it broadcasts to any parameter shape
        // (a 0-d parameter included) without changing it.
        let c = |j: usize| values.narrow(0, j, 1)?.reshape(crate::metadata::Shape::new(Vec::new()));
        for (k, (i, g)) in work.into_iter().enumerate() {
            let p = &self.params[i];
            let st = &self.state[i];
            match rule {
                Rule::Sgd { momentum, .. } => {
                    let g = g.add(&c(2)?.mul(p)?)?;
                    let step = if momentum != 0.0 {
                        let b = c(1)?.mul(&st[0])?.add(&g)?;
                        crate::compiler::trace::assign(&st[0], &b)?;
                        b
                    } else {
                        g
                    };
                    crate::compiler::trace::assign(p, &p.sub(&c(0)?.mul(&step)?)?)?;
                }
                Rule::Adam { decoupled, .. } => {
                    let (g, p_now) = if decoupled {
                        (g, p.mul(&c(0)?.mul(&c(4)?)?.neg()?.add(1.0)?)?)
                    } else {
                        (g.add(&c(4)?.mul(p)?)?, p.clone())
                    };
                    let m = c(1)?.mul(&st[0])?.add(&c(1)?.neg()?.add(1.0)?.mul(&g)?)?;
                    let v = c(2)?.mul(&st[1])?.add(&c(2)?.neg()?.add(1.0)?.mul(&g)?.mul(&g)?)?;
                    crate::compiler::trace::assign(&st[0], &m)?;
                    crate::compiler::trace::assign(&st[1], &v)?;
                    let bc0 = c(n_scalars + 2 * k)?;
                    let bc1 = c(n_scalars + 2 * k + 1)?;
                    let denom = v.sqrt()?.div(&bc1)?.add(&c(3)?)?;
                    let p_new = p_now.sub(&c(0)?.mul(&m.div(&bc0)?)?.div(&denom)?)?;
                    crate::compiler::trace::assign(p, &p_new)?;
                }
            }
        }
        let host = self.host.clone();
        crate::compiler::trace::on_commit(Box::new(move || {
            let mut h = host.lock();
            for &i in &ids {
                h.steps[i] += 1;
            }
        }));
        Ok(())
    }

    /// One update of every parameter that has a gradient.
    fn step(&mut self) -> Result<()> {
        if crate::compiler::trace::is_step() {
            return self.traced_step();
        }
        let mut host = self.host.lock();
        let mut work: Vec<(usize, Tensor)> = Vec::new();
        for (i, p) in self.params.iter().enumerate() {
            let Some(g) = p.grad() else { continue };
            // The kernel reads g and writes every parameter of its group: g
            // must not share a parameter's buffer (its own or another's).
            let shares = self.params.iter().any(|q| g.shares_storage(q));
            let own = g.is_contiguous() && g.layout().offset == 0 && !shares;
            let g = if own { g } else { g.contiguous_copy()? };
            work.push((i, g));
        }
        if work.is_empty() {
            return Ok(());
        }
        let device = self.params[0].device().clone();
        let rule = host.rule;
        let scalars = rule.scalars();
        // Groups as large as the binding limit allows: parameters, grads and
        // states in one arena share a binding, so a small model is one group.
        let mut groups: Vec<Vec<(usize, Tensor, Vec<Operand>)>> = vec![Vec::new()];
        for (i, g) in work {
            let mut operands = vec![self.params[i].operand()?, g.operand()?];
            for s in &self.state[i] {
                operands.push(s.operand()?);
            }
            let last = groups.last_mut().expect("one group at least");
            let with: Vec<Operand> =
                last.iter().flat_map(|(_, _, o)| o.iter().cloned()).chain(operands.clone()).collect();
            let (_, buffers) = Binds::of(&with, &vec![false; with.len()]);
            if !last.is_empty() && (last.len() == MAX_GROUP || buffers.len() > device.max_storage_bindings()) {
                groups.push(Vec::new());
            }
            groups.last_mut().expect("one group at least").push((i, g, operands));
        }
        for chunk in &groups {
            let mut words = vec![0u32; 12];
            words[4..4 + scalars.len()].copy_from_slice(&scalars.iter().map(|v| v.to_bits()).collect::<Vec<_>>());
            let mut total = 0usize;
            let mut operands = Vec::new();
            let mut corrections = Vec::new();
            for (i, _, o) in chunk {
                host.steps[*i] += 1;
                corrections.extend(rule.corrections(host.steps[*i]).map(f32::to_bits));
                words.push(total as u32);
                total += self.params[*i].numel();
                operands.extend(o.iter().cloned());
            }
            words.push(total as u32);
            words.extend(corrections);
            words.extend(operands.iter().map(Operand::base));
            words[0] = total as u32;
            if total == 0 {
                continue;
            }
            let written = rule.written(chunk.len());
            let (binds, buffers) = Binds::of(&operands, &written);
            let pipeline = device.pipeline("optimizer", &rule.source(chunk.len(), &binds))?;
            let grid = device.grid_1d(total as u64)?;
            // Parameter, gradient and states read; parameter and states written.
            let bytes = 4 * total as u64 * (3 + 2 * rule.state_count() as u64);
            let info =
                KernelInfo::new("optimizer", format!("{} over {} parameters", rule.name(), chunk.len()), bytes, 0);
            device.dispatch("step", &info, &pipeline, &words, &buffers, &operands, &written, grid)?;
            for (i, _, _) in chunk {
                self.params[*i].pooled()?.bump_version();
            }
        }
        Ok(())
    }

    fn zero_grad(&self) {
        for p in &self.params {
            p.zero_grad();
        }
    }
}

/// Common interface of the optimizers.
pub trait Optimizer {
    /// Updates every parameter that has a `.grad`, in place.
    fn step(&mut self) -> Result<()>;
    /// Forgets every parameter's `.grad`.
    fn zero_grad(&self);
    /// The parameters, in the order given.
    fn params(&self) -> &[Tensor];
    /// The learning rate.
    fn lr(&self) -> f64;
    /// Sets the learning rate for the next steps (a schedule calls this).
    /// A compiled step reads it at every call: no re-trace. A NaN,
    /// infinite or negative rate is an `Err` and changes nothing.
    fn set_lr(&mut self, lr: f64) -> Result<()>;
}

/// Stochastic gradient descent with momentum and weight decay (PyTorch's
/// `SGD`: `buf = momentum buf + (g + wd p)`, `p -= lr buf`).
///
/// ```
/// # use wgrad::{Device, Tensor, Sgd, Optimizer};
/// # let device = Device::new()?;
/// let w = Tensor::from_slice(&[1.0f32, -2.0], [2], &device)?.requires_grad(true)?;
/// let mut opt = Sgd::new(&[w.clone()], 0.1, 0.0, 0.0)?;
/// w.square()?.sum_all()?.backward()?; // grad 2w
/// opt.step()?;
/// assert_eq!(w.to_vec::<f32>()?, vec![0.8, -1.6]);
/// # Ok::<(), wgrad::Error>(())
/// ```
pub struct Sgd(Core);

impl Sgd {
    /// SGD over `params` (leaves that require grad, f32, owning their data).
    pub fn new(params: &[Tensor], lr: f64, momentum: f64, weight_decay: f64) -> Result<Sgd> {
        Ok(Sgd(Core::new("Sgd::new", params, Rule::Sgd { lr, momentum, weight_decay })?))
    }
}

/// Adam (`weight_decay` added to the gradient, as PyTorch's `Adam`).
pub struct Adam(Core);

impl Adam {
    /// Adam over `params` with PyTorch's defaults for the rest: betas (0.9, 0.999), eps 1e-8.
    pub fn new(params: &[Tensor], lr: f64) -> Result<Adam> {
        Adam::with(params, lr, (0.9, 0.999), 1e-8, 0.0)
    }

    /// Adam with every hyperparameter.
    pub fn with(params: &[Tensor], lr: f64, betas: (f64, f64), eps: f64, weight_decay: f64) -> Result<Adam> {
        let rule = Rule::Adam { lr, betas, eps, weight_decay, decoupled: false };
        Ok(Adam(Core::new("Adam::new", params, rule)?))
    }
}

/// AdamW: Adam with decoupled weight decay (`p *= 1 - lr wd` before the step).
pub struct AdamW(Core);

impl AdamW {
    /// AdamW with PyTorch's defaults: betas (0.9, 0.999), eps 1e-8, weight decay 0.01.
    pub fn new(params: &[Tensor], lr: f64) -> Result<AdamW> {
        AdamW::with(params, lr, (0.9, 0.999), 1e-8, 0.01)
    }

    /// AdamW with every hyperparameter.
    pub fn with(params: &[Tensor], lr: f64, betas: (f64, f64), eps: f64, weight_decay: f64) -> Result<AdamW> {
        let rule = Rule::Adam { lr, betas, eps, weight_decay, decoupled: true };
        Ok(AdamW(Core::new("AdamW::new", params, rule)?))
    }
}

macro_rules! optimizer {
    ($t:ty) => {
        impl Optimizer for $t {
            fn step(&mut self) -> Result<()> {
                self.0.step()
            }
            fn zero_grad(&self) {
                self.0.zero_grad()
            }
            fn params(&self) -> &[Tensor] {
                &self.0.params
            }
            fn lr(&self) -> f64 {
                self.0.lr()
            }
            fn set_lr(&mut self, lr: f64) -> Result<()> {
                self.0.set_lr(concat!(stringify!($t), "::set_lr"), lr)
            }
        }
    };
}
optimizer!(Sgd);
optimizer!(Adam);
optimizer!(AdamW);

/// Scales the gradients of `params` so their global L2 norm is at most
/// `max_norm` (PyTorch's `clip_grad_norm_`); returns the norm before
/// clipping as a scalar tensor. Runs on the device: nothing is read back.
pub fn clip_grad_norm(params: &[Tensor], max_norm: f64) -> Result<Option<Tensor>> {
    let _no_grad = crate::no_grad();
    let grads: Vec<(usize, Tensor)> = params.iter().enumerate().filter_map(|(i, p)| p.grad().map(|g| (i, g))).collect();
    let Some((_, first)) = grads.first() else { return Ok(None) };
    let mut total = first.square()?.sum_all()?;
    for (_, g) in &grads[1..] {
        total = total.add(&g.square()?.sum_all()?)?;
    }
    let norm = total.sqrt()?;
    let coef = norm.add(1e-6)?.rdiv(max_norm)?.minimum(1.0)?;
    for (i, g) in grads {
        params[i].set_grad(Some(g.mul(&coef)?))?;
    }
    Ok(Some(norm))
}

/// A learning-rate schedule: the rate for each step, from the rate the
/// optimizer had when the schedule was made. Call [`LrScheduler::step`]
/// after each optimizer step (between calls of a compiled step: a compiled
/// step reads the rate at every call, so a schedule needs no re-trace).
pub trait LrScheduler {
    /// Advances one step and sets the optimizer's rate for the next one.
    fn step(&mut self, opt: &mut dyn Optimizer) -> Result<()>;
    /// The rate set by the last call (the initial rate before any).
    fn last_lr(&self) -> f64;
}

/// PyTorch's `StepLR`: the rate times `gamma` every `step_size` steps,
/// `lr = base gamma^(floor(t / step_size))`.
///
/// ```
/// # use wgrad::{Device, Tensor, Sgd, Optimizer, StepLr, LrScheduler};
/// # let device = Device::new()?;
/// # let w = Tensor::from_slice(&[1.0f32], [1], &device)?.requires_grad(true)?;
/// let mut opt = Sgd::new(&[w], 0.1, 0.0, 0.0)?;
/// let mut schedule = StepLr::new(&opt, 2, 0.5)?;
/// for _ in 0..4 {
///     schedule.step(&mut opt)?;
/// }
/// assert_eq!(opt.lr(), 0.025); // 0.1 halved at steps 2 and 4
/// # Ok::<(), wgrad::Error>(())
/// ```
pub struct StepLr {
    base: f64,
    step_size: u64,
    gamma: f64,
    t: u64,
    last: f64,
}

impl StepLr {
    /// Multiplies `opt`'s current rate by `gamma` every `step_size` steps.
    pub fn new(opt: &dyn Optimizer, step_size: u64, gamma: f64) -> Result<StepLr> {
        if step_size == 0 || !gamma.is_finite() || gamma < 0.0 {
            return Err(Error::InvalidArgument {
                op: "StepLr::new",
                message: format!(
                    "step_size {step_size} and gamma {gamma}: step_size must be >= 1, gamma finite and >= 0"
                ),
            });
        }
        Ok(StepLr { base: opt.lr(), step_size, gamma, t: 0, last: opt.lr() })
    }
}

impl StepLr {
    /// The rate of step `t` (0-based).
    pub fn lr_at(&self, t: u64) -> f64 {
        self.base * self.gamma.powi((t / self.step_size).min(i32::MAX as u64) as i32)
    }
}

/// Sets `opt`'s rate to `lr`, a schedule's rate for step `t + 1`, and
/// advances the schedule (only once the optimizer took the rate).
fn advance(opt: &mut dyn Optimizer, t: &mut u64, last: &mut f64, lr: f64) -> Result<()> {
    opt.set_lr(lr)?;
    *t += 1;
    *last = lr;
    Ok(())
}

impl LrScheduler for StepLr {
    fn step(&mut self, opt: &mut dyn Optimizer) -> Result<()> {
        let lr = self.lr_at(self.t + 1);
        advance(opt, &mut self.t, &mut self.last, lr)
    }
    fn last_lr(&self) -> f64 {
        self.last
    }
}

/// A linear warm-up over the first `warmup` steps (step `t` gets
/// `base (t + 1) / (warmup + 1)`, so no step has rate 0), then a cosine
/// decay from the base rate to `min_lr` at step `total` (and `min_lr`
/// after): `transformers.get_cosine_schedule_with_warmup` with a floor and
/// a warm-up that starts above 0.
pub struct CosineWithWarmup {
    base: f64,
    warmup: u64,
    total: u64,
    min_lr: f64,
    t: u64,
    last: f64,
}

impl CosineWithWarmup {
    /// Warms `opt`'s current rate up over `warmup` steps and decays it to
    /// `min_lr` by step `total`. Sets the first step's rate now.
    pub fn new(opt: &mut dyn Optimizer, warmup: u64, total: u64, min_lr: f64) -> Result<CosineWithWarmup> {
        let base = opt.lr();
        if total < warmup || !min_lr.is_finite() || min_lr < 0.0 || min_lr > base {
            return Err(Error::InvalidArgument {
                op: "CosineWithWarmup::new",
                message: format!(
                    "warmup {warmup}, total {total}, min_lr {min_lr}: need warmup <= total and 0 <= min_lr <= the \
                     optimizer's rate {base}"
                ),
            });
        }
        let mut s = CosineWithWarmup { base, warmup, total, min_lr, t: 0, last: base };
        let first = s.lr_at(0);
        opt.set_lr(first)?;
        s.last = first;
        Ok(s)
    }

    /// The rate of step `t` (0-based).
    pub fn lr_at(&self, t: u64) -> f64 {
        if t < self.warmup {
            return self.base * (t + 1) as f64 / (self.warmup + 1) as f64;
        }
        let span = (self.total - self.warmup).max(1) as f64;
        let progress = ((t - self.warmup) as f64 / span).min(1.0);
        self.min_lr + (self.base - self.min_lr) * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos())
    }
}

impl LrScheduler for CosineWithWarmup {
    fn step(&mut self, opt: &mut dyn Optimizer) -> Result<()> {
        let lr = self.lr_at(self.t + 1);
        advance(opt, &mut self.t, &mut self.last, lr)
    }
    fn last_lr(&self) -> f64 {
        self.last
    }
}

#[cfg(test)]
mod kernel_tests {
    use super::Rule;
    use crate::exec::bind::Binds;
    use crate::metadata::DType;

    /// Every update rule's kernel validates with naga, with one binding per
    /// tensor and with all of them in the f32 arena (one binding: what
    /// WebGPU's 8 storage bindings are met with).
    #[test]
    fn optimizer_kernels_validate_in_every_binding_pattern() {
        let rules = [
            Rule::Sgd { lr: 0.1, momentum: 0.0, weight_decay: 0.0 },
            Rule::Sgd { lr: 0.1, momentum: 0.9, weight_decay: 0.01 },
            Rule::Adam { lr: 1e-3, betas: (0.9, 0.999), eps: 1e-8, weight_decay: 0.0, decoupled: false },
            Rule::Adam { lr: 1e-3, betas: (0.9, 0.999), eps: 1e-8, weight_decay: 0.1, decoupled: true },
        ];
        for rule in rules {
            for n in [1, 3, 20] {
                let written = rule.written(n);
                let dtypes = vec![DType::F32; written.len()];
                for binds in [Binds::separate(&dtypes, &written), Binds::by_dtype(&dtypes, &written)] {
                    let source = rule.source(n, &binds);
                    let module = naga::front::wgsl::parse_str(&source)
                        .unwrap_or_else(|e| panic!("{rule:?} {n}: {}\n{source}", e.emit_to_string(&source)));
                    naga::valid::Validator::new(naga::valid::ValidationFlags::all(), naga::valid::Capabilities::all())
                        .validate(&module)
                        .unwrap_or_else(|e| panic!("{rule:?} {n}: {e:?}\n{source}"));
                    assert_eq!(source.matches("var<storage").count(), binds.bindings.len());
                    // One binding per role (the arena): one body indexed by
                    // the parameter, no branch per element.
                    let one_per_role = binds.bindings.len() == 1 || n == 1;
                    assert_eq!(source.contains("switch"), !one_per_role, "{rule:?} {n}\n{source}");
                }
            }
        }
    }
}
