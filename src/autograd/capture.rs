//! The compiled backward, engine side: with a compiler installed, every
//! backward builds the graph's signature and asks the compiler for a
//! program; on a miss it runs the same walk as eager mode under the
//! tracing executor and hands the captured graph over. Then the program
//! replays on this call's tensors, and the results are published exactly
//! as eager mode publishes them.

use std::collections::HashMap;
use std::ops::Range;
use std::sync::Arc;

use crate::autograd::engine::{
    BackwardOptions, GraphTask, NewGrads, WalkEnv, accumulated, finish, leaf_of, mismatch_error, run_hooks, walk,
};
use crate::autograd::grad_mode::set_grad_enabled;
use crate::autograd::graph::{Node, NodeKind};
use crate::autograd::shadow::Learn;
use crate::compiler::ir::{CapturedGraph, OutputRole};
use crate::compiler::trace::{self, TraceScope};
use crate::compiler::{CompilerInterface, Signature};
use crate::error::Result;
use crate::metadata::InputMetadata;
use crate::tensor::Tensor;

/// The tensors a program is bound to, in signature order, and which of
/// them each node gets. A tensor saved by several nodes (`x * x`, `sin(x)`
/// and `x * w`) is bound once, so the compiler sees one input and can
/// merge what is computed from it.
pub(crate) struct Bindings {
    pub tensors: Vec<Tensor>,
    pub seeds: Range<usize>,
    pub saved: HashMap<usize, Vec<usize>>,
    /// Node position of a leaf -> the slot of its old `.grad`.
    pub old_grads: HashMap<usize, usize>,
    /// Whether the program adds the old `.grad`s itself. Not when the graph
    /// has hooks: a hook may change a `.grad` mid-backward (`zero_grad`,
    /// `set_grad`), and eager mode reads `.grad` after every hook has run,
    /// so the compiled backward adds them after the replay, as eager does.
    pub accumulates: bool,
}

pub(crate) fn bindings(task: &GraphTask) -> Bindings {
    let mut tensors: Vec<Tensor> = task.roots.iter().map(|(_, s)| s.clone()).collect();
    let seeds = 0..tensors.len();
    let mut saved = HashMap::new();
    let mut old_grads = HashMap::new();
    let accumulates = task.targets.is_none() && !task.order.iter().any(|n| n.has_hooks());
    for (i, node) in task.order.iter().enumerate() {
        match &node.kind {
            NodeKind::Op(_) if task.needs[i].iter().any(|&b| b) => {
                let mut slots = Vec::new();
                for t in node.saved.lock().iter().flatten() {
                    let slot = match tensors.iter().position(|b| b.same_view(t)) {
                        Some(slot) => slot,
                        None => {
                            tensors.push(t.clone());
                            tensors.len() - 1
                        }
                    };
                    slots.push(slot);
                }
                saved.insert(i, slots);
            }
            NodeKind::AccumulateGrad(leaf) if accumulates => {
                if let Some(g) = leaf.grad.lock().clone() {
                    old_grads.insert(i, tensors.len());
                    tensors.push(g);
                }
            }
            _ => {}
        }
    }
    Bindings { tensors, seeds, saved, old_grads, accumulates }
}

/// Capture: placeholders instead of tensors, hook points instead of hooks.
struct TraceEnv<'a> {
    bindings: &'a Bindings,
    placeholders: Vec<Tensor>,
    /// For a shadow of the backward at another batch size: what the walk
    /// learns of its leaves.
    learn: Option<&'a mut Learn>,
}

impl WalkEnv for TraceEnv<'_> {
    fn saved(&mut self, position: usize, _: &Node) -> Result<Vec<Tensor>> {
        if let Some(learn) = self.learn.as_deref_mut() {
            learn.at = position;
        }
        let slots = self.bindings.saved.get(&position).map(Vec::as_slice).unwrap_or(&[]);
        Ok(slots.iter().map(|&s| self.placeholders[s].clone()).collect())
    }
    fn seed(&mut self, r: usize, _: &Tensor) -> Tensor {
        self.placeholders[self.bindings.seeds.start + r].clone()
    }
    fn hooks(&mut self, position: usize, _: &Node, g: Tensor) -> Result<Tensor> {
        trace::hook(position, &g)
    }
    fn mismatch(&mut self, node: &Node, input: usize, child: usize, got: InputMetadata) -> Result<()> {
        match self.learn.as_deref_mut() {
            Some(learn) if learn.other_shapes.get(&child) == Some(&got) => {
                learn.flips.push(child);
                Ok(())
            }
            _ => Err(mismatch_error(node, input, got)),
        }
    }
}

/// Traces the backward formulas into a graph whose outputs are the new
/// `.grad`s (old + new where a `.grad` exists) and the captured gradients.
pub(crate) fn capture(
    task: &GraphTask,
    bindings: &Bindings,
    device: &crate::Device,
    learn: Option<&mut Learn>,
) -> Result<CapturedGraph> {
    let scope = TraceScope::start(device)?;
    let _mode = set_grad_enabled(false);
    let placeholders: Vec<Tensor> = bindings.tensors.iter().map(trace::input).collect();
    let mut env = TraceEnv { bindings, placeholders, learn };
    let result = walk(task, &mut env)?;
    let mut outputs = Vec::new();
    for (i, g) in result.leaf_grads {
        let total = match bindings.old_grads.get(&i) {
            Some(&slot) => env.placeholders[slot].add(&g)?,
            None => g,
        };
        outputs.push((total, OutputRole::Leaf(i)));
    }
    let mut captured: Vec<(usize, Tensor)> = result.captured.into_iter().collect();
    captured.sort_by_key(|(i, _)| *i);
    outputs.extend(captured.into_iter().map(|(i, g)| (g, OutputRole::Captured(i))));
    outputs.extend(result.retained.into_iter().map(|(i, g)| (g, OutputRole::Retained(i))));
    let outputs = outputs.into_iter().map(|(t, role)| Ok((trace::output(&t)?, role))).collect::<Result<Vec<_>>>()?;
    let (values, inputs) = scope.finish();
    Ok(CapturedGraph { values, inputs, outputs })
}

/// Runs `task` through `compiler`; `Ok(None)` when this backward must run
/// eagerly instead (the compiler is told why).
pub(crate) fn run_compiled(
    task: &GraphTask,
    compiler: Arc<dyn CompilerInterface>,
    options: BackwardOptions,
) -> Result<Option<HashMap<usize, Tensor>>> {
    if options.create_graph {
        compiler.fallback("create_graph records the backward as a differentiable graph; it runs eagerly");
        return Ok(None);
    }
    let device = compiler.device().clone();
    let bindings = bindings(task);
    if bindings.tensors.iter().any(|t| t.device() != &device) {
        compiler.fallback("the graph's tensors are on another device than the compiler's");
        return Ok(None);
    }
    let signature = Signature::of(task, options, &bindings);
    let program = match compiler.lookup(&signature) {
        Some(program) => program,
        None => {
            let graph = capture(task, &bindings, &device, None)?;
            let mut smaller = || crate::autograd::shadow::smaller_sizes(task, &bindings, options, &device);
            compiler.compile_with_sizes(&signature, graph, &mut smaller)?
        }
    };
    if program.is_replaying_here() {
        compiler.fallback("a hook of this program started a backward with the same signature");
        return Ok(None);
    }
    let Some(outputs) = program.run(&bindings.tensors, &mut |point, g| run_hooks(&task.order[point], g))? else {
        compiler.fallback("this call's tensors span more buffers than a kernel of the program may bind");
        return Ok(None);
    };
    compiler.replayed(&program);
    // Sums with the old `.grad`s record nothing, whatever the caller's grad
    // mode (a compiled backward never has `create_graph`), as in eager mode.
    let _mode = set_grad_enabled(false);
    let mut new_grads = NewGrads::default();
    let mut captured = HashMap::new();
    for (role, t) in program.roles().iter().zip(outputs) {
        match role {
            OutputRole::Leaf(i) => {
                let leaf = leaf_of(task, *i).expect("leaf output").clone();
                let old = if bindings.accumulates { None } else { leaf.grad.lock().clone() };
                new_grads.leaves.push((leaf, accumulated(old, t)?));
            }
            OutputRole::Captured(input) => {
                captured.insert(*input, t);
            }
            OutputRole::Retained(position) => new_grads.retain(task, *position, t)?,
            OutputRole::Returned(_) | OutputRole::StepGrad(_) | OutputRole::Assign(_) => {
                return Err(crate::Error::InvalidArgument {
                    op: "compiled backward",
                    message: "internal: a backward program has a compiled step's output".into(),
                });
            }
        }
    }
    finish(task, new_grads, options)?;
    Ok(Some(captured))
}
