//! GPU errors attributed to the tensors they spoil.
//!
//! What the host can check, it checks at the call, so the op returns its own
//! `Err`: shapes and ranks (`layout::check_shape`), indices, and here the
//! usage conflict of storage bound twice where one binding writes it.
//!
//! What only the GPU can report arrives later: wgpu rejects the whole
//! command buffer of a batch when one command in it fails. Then nothing in
//! that batch ran, so every buffer a command of the batch writes holds stale
//! data. Those buffers are *spoiled*: each carries the op that wrote it and
//! the GPU's message, and reading one returns `Error::GpuFailed` naming that
//! op instead of the stale bytes. A command that reads a spoiled buffer
//! spoils what it writes, so the error follows every value computed from it;
//! a command that writes a buffer from clean inputs cleans it (a pooled
//! buffer handed to a new tensor). Tensors that depend on nothing spoiled
//! read normally, and the device goes on working.
//!
//! Native wgpu reports a failed submit synchronously (through the
//! uncaptured-error handler, during `queue.submit`), so the batch is
//! spoiled before `submit_batch` returns and nothing blocks. In a browser
//! the report comes later, as a promise: there each batch's writes would be
//! kept until its error scope resolves, and spoiled then (no blocking wait,
//! as reads are asynchronous there too).

use std::collections::HashMap;
use std::ops::Range;
use std::sync::Arc;

use crate::error::{Error, Result};
use crate::exec::bind::Operand;

/// Why a buffer's contents are not what its last writer meant.
#[derive(Debug, Clone)]
pub(crate) struct Spoiled {
    /// The op whose command wrote the buffer (or the first spoiled one
    /// upstream of it).
    pub op: &'static str,
    /// What the GPU said.
    pub message: Arc<str>,
}

impl Spoiled {
    pub fn error(&self) -> Error {
        Error::GpuFailed { op: self.op, message: self.message.to_string() }
    }
}

/// The spoiled allocations of one device, by buffer and byte range (an
/// arena holds many tensors; a failed batch spoils the ranges it writes,
/// not the whole arena). It lives in the buffer pool, so an allocation's
/// entry goes when it returns there.
#[derive(Default)]
pub(crate) struct Poison {
    spoiled: HashMap<wgpu::Buffer, Vec<(Range<u64>, Spoiled)>>,
}

fn overlap(a: &Range<u64>, b: &Range<u64>) -> bool {
    a.start < b.end && b.start < a.end
}

impl Poison {
    /// A command of `op` reads `bound` (every operand it binds, written ones
    /// included: a read-write binding is read too) and writes `writes`:
    /// the writes are spoiled if anything bound is, clean otherwise.
    pub fn record(&mut self, bound: &[&Operand], writes: &[&Operand]) {
        if self.spoiled.is_empty() {
            return;
        }
        let upstream = bound.iter().find_map(|o| self.get(&o.buffer, &o.range)).cloned();
        for w in writes {
            self.forget(&w.buffer, w.range.clone());
            if let Some(s) = &upstream {
                self.spoiled.entry(w.buffer.clone()).or_default().push((w.range.clone(), s.clone()));
            }
        }
    }

    /// The batch that wrote `writes` (each with its op) failed with `message`.
    pub fn spoil(&mut self, writes: Vec<(&'static str, wgpu::Buffer, Range<u64>)>, message: &str) {
        let message: Arc<str> = message.into();
        for (op, buffer, range) in writes {
            self.forget(&buffer, range.clone());
            self.spoiled.entry(buffer).or_default().push((range, Spoiled { op, message: message.clone() }));
        }
    }

    /// Why bytes `range` of `buffer` are stale, if they are.
    pub fn get(&self, buffer: &wgpu::Buffer, range: &Range<u64>) -> Option<&Spoiled> {
        self.spoiled.get(buffer)?.iter().find(|(r, _)| overlap(r, range)).map(|(_, s)| s)
    }

    /// Forgets what spoiled bytes `range` of `buffer` (new contents, or the
    /// allocation went back to the pool).
    pub fn forget(&mut self, buffer: &wgpu::Buffer, range: Range<u64>) {
        if let Some(list) = self.spoiled.get_mut(buffer) {
            list.retain(|(r, _)| !overlap(r, &range));
            if list.is_empty() {
                self.spoiled.remove(buffer);
            }
        }
    }
}

/// `Err` naming `op` when an operand it writes overlaps another operand
/// (the same storage, seen twice): the kernel would race with itself, and
/// on separate bindings wgpu would reject the whole batch, so it is
/// refused here, at the call, instead. Operands in one arena share a
/// binding and do not conflict unless their ranges overlap. `in_place`
/// lists (read, written) operand pairs the kernel may put on one storage
/// (it reads each element only where it writes it): on the same range
/// they are no conflict.
pub(crate) fn check_conflicts(
    op: &'static str,
    operands: &[Operand],
    written: &[bool],
    in_place: &[(usize, usize)],
) -> Result<()> {
    for (w, written_operand) in operands.iter().enumerate().filter(|&(w, _)| written[w]) {
        let allowed =
            |j: usize| in_place.contains(&(j, w)) && operands[j].range == written_operand.range && !written[j];
        if let Some(other) =
            (0..operands.len()).find(|&j| j != w && operands[j].overlaps(written_operand) && !allowed(j))
        {
            return Err(Error::InvalidArgument {
                op,
                message: format!(
                    "would read and write the same device storage in one kernel (operands {} and {}), which \
                     races; this happens when a tensor it updates in place shares storage with \
                     another operand (e.g. a `.grad` set to a parameter or a view of one): pass a copy \
                     (`.contiguous()` of a clone) instead",
                    other.min(w) + 1,
                    other.max(w) + 1
                ),
            });
        }
    }
    Ok(())
}

/// The op name of a dispatch a test records *without* the host checks, to
/// make the GPU reject a batch (only in the crate's own unit tests).
pub(crate) const INJECTED_FAULT: &str = "injected fault";

/// Records a kernel that reads and writes `t`'s buffer through two
/// bindings: a usage conflict the host checks would refuse, so the GPU
/// rejects the batch it lands in.
#[cfg(test)]
fn inject_usage_conflict(device: &crate::Device, t: &crate::Tensor) {
    use crate::exec::kernel::MapKernel;
    use crate::metadata::{DType, Shape};
    let mut k = MapKernel::default();
    let x = k.input(DType::F32);
    k.output(x);
    let shape = Shape::new([t.numel()]);
    let layout = crate::layout::Layout::contiguous(shape.clone());
    let launch = crate::exec::map_launch(
        device,
        INJECTED_FAULT,
        k,
        &shape,
        std::slice::from_ref(&layout),
        std::slice::from_ref(&layout),
        &[],
    )
    .unwrap();
    // Two bindings of one buffer, one of them written: the host check
    // (skipped for this op) would refuse it.
    let binds = crate::exec::bind::Binds::separate(&[DType::F32; 2], &[false, true]);
    let pipeline = device.pipeline(INJECTED_FAULT, &launch.source(&binds)).unwrap();
    let operand = t.operand().unwrap();
    let operands = [operand.clone(), operand.clone()];
    let words = launch.words_for(&operands);
    let buffers = [operand.buffer.clone(), operand.buffer.clone()];
    device
        .dispatch(INJECTED_FAULT, &launch.info, &pipeline, &words, &buffers, &operands, &[false, true], launch.grid)
        .unwrap();
}

#[cfg(test)]
mod fault_tests {
    use super::inject_usage_conflict;
    use crate::{DType, Device, Error, Tensor};

    fn values(t: &Tensor) -> crate::Result<Vec<f32>> {
        t.to_vec::<f32>()
    }

    /// A GPU error in the middle of a batch: every tensor that batch (or a
    /// later op on its results) computes reports the error and the op; every
    /// other tensor reads its own value; the device works afterwards.
    #[test]
    fn a_failed_batch_spoils_exactly_what_depends_on_it() {
        let device = Device::new().unwrap();
        let earlier = Tensor::from_slice(&[1.0f32, 2.0], [2], &device).unwrap();
        assert_eq!(values(&earlier).unwrap(), vec![1.0, 2.0]);
        // One batch: an upload, an elementwise op, the fault, another op.
        let uploaded = Tensor::from_slice(&[10.0f32, 20.0, 30.0], [3], &device).unwrap();
        let doubled = earlier.mul(2.0).unwrap();
        inject_usage_conflict(&device, &uploaded);
        let later = doubled.add(1.0).unwrap();
        for (name, t) in [("uploaded", &uploaded), ("doubled", &doubled), ("later", &later)] {
            match values(t) {
                Err(Error::GpuFailed { op, message }) => {
                    assert!(!message.is_empty(), "{name}");
                    assert!(["from_slice", "mul", "add", super::INJECTED_FAULT].contains(&op), "{name}: {op}");
                }
                other => panic!("{name}: expected GpuFailed, got {other:?}"),
            }
        }
        // Written before the failed batch: intact.
        assert_eq!(values(&earlier).unwrap(), vec![1.0, 2.0]);
        // Computed from a spoiled tensor after the failure: spoiled too.
        let downstream = later.exp().unwrap();
        assert!(matches!(values(&downstream), Err(Error::GpuFailed { .. })));
        // The device still works, and pooled buffers reused for new tensors are clean.
        drop((uploaded, doubled, later, downstream));
        for _ in 0..3 {
            let fresh = Tensor::from_slice(&[3.0f32, 4.0, 5.0], [3], &device).unwrap();
            assert_eq!(values(&fresh.mul(2.0).unwrap()).unwrap(), vec![6.0, 8.0, 10.0]);
            assert_eq!(values(&earlier.add(1.0).unwrap()).unwrap(), vec![2.0, 3.0]);
        }
        device.synchronize().unwrap();
    }

    /// A GPU error in the batch a compiled step replays in: the parameters
    /// it updated in place, the `.grad`s it set and the loss it returned all
    /// report the failure; a tensor it did not touch reads its value.
    #[test]
    fn a_failed_batch_spoils_what_a_compiled_step_updated() {
        use crate::Optimizer;
        let device = Device::new().unwrap();
        let w = Tensor::from_slice(&[1.0f32, -2.0, 3.0, 0.5], [4], &device).unwrap().requires_grad(true).unwrap();
        let other = Tensor::from_slice(&[7.0f32], [1], &device).unwrap();
        let mut opt = crate::Sgd::new(std::slice::from_ref(&w), 0.1, 0.9, 0.0).unwrap();
        let w_in = w.clone();
        let mut step = crate::compile_step(&device, move |x: &[Tensor]| {
            opt.zero_grad();
            let loss = w_in.mul(&x[0])?.square()?.sum_all()?;
            loss.backward()?;
            opt.step()?;
            Ok(vec![loss])
        });
        let x = Tensor::from_slice(&[1.0f32, 1.0, 1.0, 1.0], [4], &device).unwrap();
        step.call(std::slice::from_ref(&x)).unwrap();
        assert!(values(&w).is_ok());
        let scratch = Tensor::from_slice(&[0.0f32; 4], [4], &device).unwrap();
        inject_usage_conflict(&device, &scratch);
        let loss = step.call(std::slice::from_ref(&x)).unwrap().remove(0);
        for (name, t) in [("parameter", w.clone()), (".grad", w.grad().unwrap()), ("loss", loss)] {
            assert!(matches!(values(&t), Err(Error::GpuFailed { .. })), "{name}: {:?}", values(&t));
        }
        assert_eq!(values(&other).unwrap(), vec![7.0]);
    }

    /// A lost device (simulated by destroying it): every read is an `Err`,
    /// nothing panics, and no stale value is returned.
    #[test]
    fn a_lost_device_gives_errors_not_panics_or_values() {
        let device = Device::new().unwrap();
        let x = Tensor::from_slice(&[1.0f32, 2.0], [2], &device).unwrap();
        assert_eq!(values(&x).unwrap(), vec![1.0, 2.0]);
        let y = x.exp().unwrap();
        device.inner.device.destroy();
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let read_y = values(&y);
            let more = Tensor::from_slice(&[3.0f32], [1], &device).and_then(|t| t.mul(2.0)).and_then(|t| values(&t));
            (read_y, more, values(&x))
        }));
        let (read_y, more, read_x) = outcome.expect("no panic on a lost device");
        for r in [&read_y, &more, &read_x] {
            assert!(matches!(r, Err(Error::DeviceLost { .. })), "{r:?}");
        }
    }

    /// An allocation past what the device can hold is refused at the call,
    /// and the pending batch around it is unaffected.
    #[test]
    fn an_allocation_past_the_device_is_refused_at_the_call() {
        let device = Device::new().unwrap();
        let x = Tensor::from_slice(&[1.0f32, 2.0], [2], &device).unwrap();
        let y = x.mul(3.0).unwrap();
        let huge = device.max_tensor_bytes() / 4 + 1;
        let err = Tensor::zeros([huge as usize], DType::F32, &device).unwrap_err();
        assert!(matches!(err, Error::TensorTooLarge { .. } | Error::OutOfMemory { .. }), "{err:?}");
        assert_eq!(values(&y).unwrap(), vec![3.0, 6.0]);
        device.synchronize().unwrap();
    }
}
