//! Compiled backward against eager on the same graph, for the op tests.

use wgrad::{Tensor, WgslCompiler};

use crate::common::device;

pub type Grads = Vec<Vec<f32>>;

pub fn grads_of(leaves: &[Tensor], name: &str) -> Grads {
    leaves
        .iter()
        .enumerate()
        .map(|(i, l)| l.grad().unwrap_or_else(|| panic!("{name}: leaf {i} has no gradient")).to_vec::<f32>().unwrap())
        .collect()
}

/// Gradients of `loss(leaves)` eagerly, then with a `WgslCompiler` installed; they must agree
/// within 1e-5 relative plus 1e-6 of the gradient's largest magnitude.
pub fn eager_vs_compiled(name: &str, leaves: &[Tensor], loss: impl Fn(&[Tensor]) -> wgrad::Result<Tensor>) {
    loss(leaves).and_then(|l| l.backward()).unwrap_or_else(|e| panic!("{name}: eager backward: {e}"));
    let eager = grads_of(leaves, name);
    leaves.iter().for_each(Tensor::zero_grad);

    let guard = WgslCompiler::install(&device()).unwrap_or_else(|e| panic!("{name}: install: {e}"));
    loss(leaves).and_then(|l| l.backward()).unwrap_or_else(|e| panic!("{name}: compiled backward: {e}"));
    let stats = guard.stats();
    drop(guard);
    let compiled = grads_of(leaves, name);
    leaves.iter().for_each(Tensor::zero_grad);
    assert!(
        stats.fallbacks == 0 && stats.captures == 1 && stats.replays == 1,
        "{name}: expected one compiled backward without fallback, got {stats:?}"
    );

    for (i, (e, c)) in eager.iter().zip(&compiled).enumerate() {
        assert_eq!(e.len(), c.len(), "{name}: leaf {i} length");
        let scale = e.iter().fold(0.0f64, |m, &v| m.max(f64::from(v).abs()));
        assert!(scale > 0.0, "{name}: leaf {i} has an all-zero gradient");
        for (j, (&ev, &cv)) in e.iter().zip(c).enumerate() {
            let (ev, cv) = (f64::from(ev), f64::from(cv));
            assert!(ev.is_finite() && cv.is_finite(), "{name}: leaf {i} element {j}: eager {ev}, compiled {cv}");
            let tol = 1e-5 * ev.abs() + 1e-6 * scale;
            assert!(
                (cv - ev).abs() <= tol,
                "{name}: leaf {i} element {j}: eager {ev:e}, compiled {cv:e} (tol {tol:e})\n  eager:    {e:?}\n  \
                 compiled: {c:?}"
            );
        }
    }
}
