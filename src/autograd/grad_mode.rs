//! Grad mode: whether ops record the graph. Thread-local, as in PyTorch.

use std::cell::Cell;

thread_local! {
    static GRAD_ENABLED: Cell<bool> = const { Cell::new(true) };
}

/// Whether ops on this thread currently record gradients.
pub fn is_grad_enabled() -> bool {
    GRAD_ENABLED.with(Cell::get)
}

/// Restores the previous grad mode when dropped.
#[must_use = "grad mode is restored when the guard drops"]
pub struct NoGradGuard {
    previous: bool,
}

impl Drop for NoGradGuard {
    fn drop(&mut self) {
        GRAD_ENABLED.with(|g| g.set(self.previous));
    }
}

/// Disables graph recording on this thread until the guard drops
/// (PyTorch's `torch.no_grad()`), e.g. for evaluation or optimizer updates.
///
/// ```
/// # let device = wgrad::Device::new()?;
/// # let w = wgrad::Tensor::ones([3], wgrad::DType::F32, &device)?.requires_grad(true)?;
/// let _guard = wgrad::no_grad();
/// let y = w.mul(2.0)?;
/// assert!(!y.needs_grad());
/// # Ok::<(), wgrad::Error>(())
/// ```
pub fn no_grad() -> NoGradGuard {
    set_grad_enabled(false)
}

pub(crate) fn set_grad_enabled(on: bool) -> NoGradGuard {
    let previous = GRAD_ENABLED.with(|g| g.replace(on));
    NoGradGuard { previous }
}
