//! The tensor-side autograd calls that observe gradients rather than
//! compute them: gradient hooks, post-accumulate hooks, and `retain_grad`.

use std::sync::Arc;

use crate::autograd::graph::{AutogradMeta, Hook, HookHandle, LeafState, PostAccumulateHook};
use crate::error::{Error, Result};
use crate::tensor::Tensor;

impl Tensor {
    /// Registers a hook on this tensor's gradient. Hooks run in registration
    /// order each time a gradient for this tensor is computed, before it is
    /// accumulated (leaves) or used further (other tensors); a hook that
    /// returns `Some(g)` replaces the gradient. The handle's `remove()`
    /// unregisters it.
    pub fn register_hook(
        &self,
        hook: impl Fn(&Tensor) -> Option<Tensor> + Send + Sync + 'static,
    ) -> Result<HookHandle> {
        let hook: Hook = Arc::new(hook);
        HookHandle::register(&self.0.autograd, hook)
            .ok_or_else(|| Error::NoGradFn { what: "the tensor given to register_hook".into() })
    }

    /// Registers a hook that runs after a backward has updated this leaf's
    /// `.grad`, and is handed the leaf (PyTorch's
    /// `register_post_accumulate_grad_hook`, on which optimizer-in-backward
    /// is built: the hook can step the parameter and drop its `.grad`).
    ///
    /// Differences from PyTorch, which runs the hook as soon as this leaf's
    /// gradient is accumulated: wgrad publishes every `.grad` of a backward
    /// together (so a failed backward changes none), and runs these hooks
    /// after that, in the order the backward reached the leaves. The first
    /// error a hook returns is the backward's result; the `.grad`s stay
    /// published, and the later hooks do not run. A hook stops running once
    /// every handle to the leaf is dropped (nothing could read its `.grad`).
    ///
    /// ```
    /// # use wgrad::{Device, Tensor, Optimizer, Sgd};
    /// # let device = Device::new()?;
    /// let w = Tensor::from_slice(&[3.0f32], [1], &device)?.requires_grad(true)?;
    /// // Optimizer in backward: each parameter steps as soon as its gradient
    /// // is ready, and its `.grad` is freed at once. (The hook holds the
    /// // optimizer, which holds `w`: `remove()` the hook to free them.)
    /// let sgd = std::sync::Mutex::new(Sgd::new(&[w.clone()], 0.5, 0.0, 0.0)?);
    /// let handle = w.register_post_accumulate_grad_hook(move |w| {
    ///     sgd.lock().expect("not poisoned").step()?;
    ///     w.set_grad(None)
    /// })?;
    /// w.mul(&w)?.sum_all()?.backward()?; // dw = 2w = 6, w = 3 - 0.5 * 6
    /// assert_eq!(w.to_vec::<f32>()?, vec![0.0]);
    /// assert!(w.grad().is_none());
    /// handle.remove();
    /// # Ok::<(), wgrad::Error>(())
    /// ```
    pub fn register_post_accumulate_grad_hook(
        &self,
        hook: impl Fn(&Tensor) -> Result<()> + Send + Sync + 'static,
    ) -> Result<HookHandle> {
        let hook: PostAccumulateHook = Arc::new(hook);
        HookHandle::register_post_accumulate(self, hook).ok_or_else(|| Error::InvalidArgument {
            op: "register_post_accumulate_grad_hook",
            message: "only a leaf that requires grad accumulates a .grad; call it on a leaf made with \
                      `.requires_grad(true)`"
                .into(),
        })
    }

    /// Keeps the gradient of this non-leaf tensor in [`Tensor::grad`] after
    /// each backward that computes it, summed across backward calls as a
    /// leaf's is (PyTorch's `retain_grad()`). On a leaf that requires grad
    /// it does nothing: a leaf's gradient is always kept.
    pub fn retain_grad(&self) -> Result<()> {
        match &self.0.autograd {
            AutogradMeta::Interior(node) => {
                node.retains_grad.store(true, std::sync::atomic::Ordering::Relaxed);
                Ok(())
            }
            AutogradMeta::Leaf(_) => Ok(()),
            AutogradMeta::None => Err(Error::InvalidArgument {
                op: "retain_grad",
                message: "this tensor does not require grad, so no gradient reaches it; call \
                          `.requires_grad(true)` on the leaves it is computed from"
                    .into(),
            }),
        }
    }

    /// Whether [`Tensor::retain_grad`] made this non-leaf keep its
    /// gradient. False for leaves, as PyTorch's `retains_grad` (a leaf that
    /// requires grad always keeps its gradient).
    pub fn retains_grad(&self) -> bool {
        match &self.0.autograd {
            AutogradMeta::Interior(node) => node.retains_grad(),
            AutogradMeta::Leaf(_) | AutogradMeta::None => false,
        }
    }
}

/// Runs the post-accumulate hooks of `leaves`, in order, after their new
/// `.grad`s were published.
pub(crate) fn run_post_accumulate_hooks(leaves: &[Arc<LeafState>]) -> Result<()> {
    for state in leaves {
        let hooks: Vec<_> = state.post_hooks.lock().iter().map(|e| (e.leaf.clone(), e.hook.clone())).collect();
        for (leaf, hook) in hooks {
            if let Some(leaf) = leaf.upgrade() {
                hook(&Tensor(leaf))?;
            }
        }
    }
    Ok(())
}
