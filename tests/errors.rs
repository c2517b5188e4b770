//! Every error path: the variant, a helpful Display message, and (where state is involved)
//! that nothing changed. The `WGRAD_ADAPTER` case lives in `adapter_env.rs`, since it sets an
//! environment variable.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use common::device;
use wgrad::{BackwardOptions, DType, Device, Error, Tensor};

fn f32s(data: &[f32], shape: &[usize]) -> Tensor {
    Tensor::from_slice(data, shape, &device()).unwrap()
}

fn leaf(data: &[f32]) -> Tensor {
    f32s(data, &[data.len()]).requires_grad(true).unwrap()
}

fn grad_of(t: &Tensor) -> Vec<f32> {
    t.grad().expect(".grad is set").to_vec::<f32>().unwrap()
}

/// The Display message is non-empty and contains every `needle`.
#[track_caller]
fn message(err: &Error, needles: &[&str]) {
    let msg = err.to_string();
    assert!(!msg.trim().is_empty(), "{err:?} has an empty message");
    for n in needles {
        assert!(msg.contains(n), "message of {err:?} lacks {n:?}: {msg}");
    }
}

// ------------------------------------------------------------------ op argument errors

#[test]
fn add_shape_mismatch_names_the_op_and_both_shapes() {
    let a = Tensor::zeros([2, 3], DType::F32, &device()).unwrap();
    let b = Tensor::zeros([4], DType::F32, &device()).unwrap();
    let err = a.add(&b).unwrap_err();
    match &err {
        Error::ShapeMismatch { op, lhs, rhs } => {
            assert_eq!(*op, "add");
            assert_eq!(lhs.dims(), &[2, 3]);
            assert_eq!(rhs.dims(), &[4]);
        }
        other => panic!("expected ShapeMismatch, got {other:?}"),
    }
    message(&err, &["add", "[2, 3]", "[4]", "reshape"]);
    // The same through the operator overload.
    assert!(matches!(&a + &b, Err(Error::ShapeMismatch { .. })));
}

#[test]
fn matmul_inner_dim_mismatch() {
    let a = Tensor::zeros([2, 3], DType::F32, &device()).unwrap();
    let b = Tensor::zeros([4, 5], DType::F32, &device()).unwrap();
    let err = a.matmul(&b).unwrap_err();
    match &err {
        Error::IncompatibleShapes { op, lhs, rhs, .. } => {
            assert_eq!(*op, "matmul");
            assert_eq!(lhs.dims(), &[2, 3]);
            assert_eq!(rhs.dims(), &[4, 5]);
        }
        other => panic!("expected IncompatibleShapes, got {other:?}"),
    }
    // The message states matmul's rule, not broadcasting's.
    message(&err, &["matmul", "[2, 3]", "[4, 5]", "[.., m, k] @ [.., k, n]"]);
    assert!(!err.to_string().contains("broadcast together"), "{err}");
    // Vector operands report the shapes the caller passed.
    let v = Tensor::zeros([4], DType::F32, &device()).unwrap();
    match a.matmul(&v).unwrap_err() {
        Error::IncompatibleShapes { lhs, rhs, .. } => {
            assert_eq!(lhs.dims(), &[2, 3]);
            assert_eq!(rhs.dims(), &[4]);
        }
        other => panic!("expected IncompatibleShapes, got {other:?}"),
    }
}

#[test]
fn dtype_mismatch() {
    let a = f32s(&[1.0, 2.0], &[2]);
    let b = Tensor::from_slice(&[1i32, 2], [2], &device()).unwrap();
    let err = a.add(&b).unwrap_err();
    assert!(matches!(err, Error::DTypeMismatch { op: "add", lhs: DType::F32, rhs: DType::I32 }), "{err:?}");
    message(&err, &["add", "to_dtype"]);
    assert!(matches!(a.matmul(&b.reshape([2, 1]).unwrap()), Err(Error::DTypeMismatch { .. })));
}

#[test]
fn unsupported_dtype() {
    let i = Tensor::from_slice(&[1i32, 2], [2], &device()).unwrap();
    let err = i.exp().unwrap_err();
    assert!(matches!(err, Error::UnsupportedDType { op: "exp", dtype: DType::I32, .. }), "{err:?}");
    message(&err, &["exp", "I32", "float"]);
    assert!(matches!(i.mean_all(), Err(Error::UnsupportedDType { .. })));
}

#[test]
fn device_mismatch() {
    let other = Device::new().unwrap();
    assert_ne!(other.id(), device().id());
    let a = f32s(&[1.0, 2.0], &[2]);
    let b = Tensor::from_slice(&[3.0f32, 4.0], [2], &other).unwrap();
    let err = a.add(&b).unwrap_err();
    match &err {
        Error::DeviceMismatch { op, lhs, rhs } => {
            assert_eq!(*op, "add");
            assert_eq!(*lhs, device().id());
            assert_eq!(*rhs, other.id());
        }
        e => panic!("expected DeviceMismatch, got {e:?}"),
    }
    message(&err, &["add", "same `Device`"]);
    assert!(matches!(
        a.reshape([1, 2]).unwrap().matmul(&b.reshape([2, 1]).unwrap()),
        Err(Error::DeviceMismatch { .. })
    ));
    // Each device still works on its own.
    assert_eq!(b.add(1.0).unwrap().to_vec::<f32>().unwrap(), vec![4.0, 5.0]);
}

#[test]
fn from_slice_with_the_wrong_element_count() {
    let err = Tensor::from_slice(&[1.0f32, 2.0, 3.0], [2, 2], &device()).unwrap_err();
    assert!(matches!(err, Error::InvalidArgument { op: "from_slice", .. }), "{err:?}");
    message(&err, &["from_slice", "3", "[2, 2]"]);
}

#[test]
fn reshape_to_the_wrong_size() {
    let x = Tensor::zeros([2, 3], DType::F32, &device()).unwrap();
    let err = x.reshape([4, 2]).unwrap_err();
    assert!(matches!(err, Error::InvalidArgument { op: "reshape", .. }), "{err:?}");
    message(&err, &["reshape", "[2, 3]", "[4, 2]"]);
}

#[test]
fn axis_out_of_range() {
    let x = Tensor::zeros([2, 3], DType::F32, &device()).unwrap();
    for axes in [&[2isize][..], &[-3]] {
        let err = x.sum(axes, false).unwrap_err();
        assert!(matches!(err, Error::InvalidArgument { op: "sum", .. }), "{err:?}");
        message(&err, &["sum", "out of range", "rank 2"]);
    }
    assert!(matches!(x.transpose(0, 2), Err(Error::InvalidArgument { op: "transpose", .. })));
    assert!(matches!(x.unsqueeze(4), Err(Error::InvalidArgument { op: "unsqueeze", .. })));
}

#[test]
fn duplicate_axis() {
    let x = Tensor::zeros([2, 3], DType::F32, &device()).unwrap();
    for axes in [&[1isize, 1][..], &[0, -2]] {
        let err = x.sum(axes, false).unwrap_err();
        assert!(matches!(err, Error::InvalidArgument { op: "sum", .. }), "{err:?}");
        message(&err, &["sum", "twice"]);
    }
    assert!(matches!(x.max(&[0, 0], true), Err(Error::InvalidArgument { op: "max", .. })));
}

#[test]
fn narrow_out_of_range() {
    let x = Tensor::zeros([2, 3], DType::F32, &device()).unwrap();
    let err = x.narrow(1, 2, 2).unwrap_err();
    assert!(matches!(err, Error::InvalidArgument { op: "narrow", .. }), "{err:?}");
    message(&err, &["narrow", "2..4", "[2, 3]"]);
    assert!(matches!(x.narrow(2, 0, 1), Err(Error::InvalidArgument { op: "narrow", .. })));
    assert!(x.narrow(1, 3, 0).is_ok(), "an empty window at the end is fine");
}

#[test]
fn permute_that_is_not_a_permutation() {
    let x = Tensor::zeros([2, 3, 4], DType::F32, &device()).unwrap();
    for perm in [&[0isize, 0, 1][..], &[0, 1], &[0, 1, 3], &[0, 1, 2, 3], &[0, -4, 1]] {
        let err = x.permute(perm).unwrap_err();
        assert!(matches!(err, Error::InvalidArgument { op: "permute", .. }), "{perm:?}: {err:?}");
        message(&err, &["permute", "not a permutation"]);
    }
    assert_eq!(x.permute(&[2, 0, 1]).unwrap().dims(), &[4, 2, 3]);
    // Negative dims count from the end, as in PyTorch.
    assert_eq!(x.permute(&[-1, 0, -2]).unwrap().dims(), &[4, 2, 3]);
}

#[test]
fn to_vec_with_the_wrong_element_type() {
    let x = f32s(&[1.0, 2.0], &[2]);
    let err = x.to_vec::<i32>().unwrap_err();
    assert!(matches!(err, Error::DTypeMismatch { op: "to_vec", lhs: DType::F32, rhs: DType::I32 }), "{err:?}");
    message(&err, &["to_vec"]);
    assert!(matches!(x.to_scalar::<f32>(), Err(Error::InvalidArgument { op: "to_scalar", .. })));
}

#[test]
fn requires_grad_on_an_integer_tensor() {
    let i = Tensor::from_slice(&[1i32, 2], [2], &device()).unwrap();
    let err = i.requires_grad(true).unwrap_err();
    assert!(matches!(err, Error::UnsupportedDType { op: "requires_grad", dtype: DType::I32, .. }), "{err:?}");
    message(&err, &["requires_grad", "float", "to_dtype"]);
    assert!(!i.requires_grad(false).unwrap().needs_grad());
}

#[test]
fn tensor_larger_than_the_device_limit() {
    // A device of its own, so the memory counters are not disturbed by other tests.
    let dev = Device::new().unwrap();
    let limit = dev.max_tensor_bytes();
    let before = dev.memory_stats();
    let numel = (limit / 4 + 1) as usize; // f32: limit + 1..4 bytes
    let err = Tensor::zeros([numel], DType::F32, &dev).unwrap_err();
    match &err {
        Error::TensorTooLarge { bytes, limit: l } => {
            assert_eq!(*l, limit);
            assert_eq!(*bytes, numel as u64 * 4);
            assert!(*bytes > *l);
        }
        e => panic!("expected TensorTooLarge, got {e:?}"),
    }
    message(&err, &["split"]);
    // Also as a 2-D shape, and through the random constructor.
    let rows = (limit / 4 / 1024 + 1) as usize;
    assert!(matches!(Tensor::ones([rows, 1024], DType::F32, &dev), Err(Error::TensorTooLarge { .. })));
    assert!(matches!(Tensor::rand([numel], 0, &dev), Err(Error::TensorTooLarge { .. })));
    assert_eq!(dev.memory_stats(), before, "a refused allocation leaves the pool as it was");
    // The device is still usable.
    let ok = Tensor::full([4], 2.0, DType::F32, &dev).unwrap();
    assert_eq!(ok.to_vec::<f32>().unwrap(), vec![2.0; 4]);
}

// ------------------------------------------------------------------ backward errors

#[test]
fn backward_on_a_non_scalar() {
    let x = leaf(&[1.0, 2.0, 3.0]);
    let y = x.mul(2.0).unwrap();
    let err = y.backward().unwrap_err();
    match &err {
        Error::NonScalarBackward { shape } => assert_eq!(shape.dims(), &[3]),
        e => panic!("expected NonScalarBackward, got {e:?}"),
    }
    message(&err, &["[3]", "sum_all", "backward_with"]);
    assert!(x.grad().is_none());
    // The same through grad() without grad_outputs.
    assert!(matches!(
        wgrad::grad(&[&y], &[&x], None, BackwardOptions::default()),
        Err(Error::NonScalarBackward { .. })
    ));
    // The graph was not released: a reduced backward still works.
    y.sum_all().unwrap().backward().unwrap();
    assert_eq!(grad_of(&x), vec![2.0; 3]);
}

#[test]
fn backward_on_a_tensor_that_does_not_require_grad() {
    let x = f32s(&[1.0, 2.0], &[2]);
    let err = x.sum_all().unwrap().backward().unwrap_err();
    assert!(matches!(err, Error::NoGradFn { .. }), "{err:?}");
    message(&err, &["requires_grad(true)"]);

    // grad() w.r.t. an input that does not require grad.
    let w = leaf(&[1.0, 2.0]);
    let y = w.mul(&x).unwrap().sum_all().unwrap();
    let err = wgrad::grad(&[&y], &[&x], None, BackwardOptions::default()).unwrap_err();
    assert!(matches!(err, Error::NoGradFn { .. }), "{err:?}");
    message(&err, &["input 0", "requires_grad(true)"]);
    assert!(w.grad().is_none());
}

#[test]
fn backward_twice_without_retain_graph() {
    let a = leaf(&[1.0, 2.0]);
    let b = leaf(&[3.0, 4.0]);
    let loss = a.mul(&b).unwrap().exp().unwrap().sum_all().unwrap();
    loss.backward().unwrap();
    let (ga, gb) = (grad_of(&a), grad_of(&b));
    let err = loss.backward().unwrap_err();
    assert!(matches!(err, Error::GraphReleased { .. }), "{err:?}");
    message(&err, &["retain_graph", "second time"]);
    assert_eq!(grad_of(&a), ga);
    assert_eq!(grad_of(&b), gb);
    // grad() on the released graph fails the same way.
    assert!(matches!(wgrad::grad(&[&loss], &[&a], None, BackwardOptions::default()), Err(Error::GraphReleased { .. })));
}

/// A hook returning a wrong-shaped gradient fails the backward, and a failed backward leaves
/// every `.grad` as it was, including leaves the engine reached before the failure; the graph
/// is not released, so the backward can be run again once the hook behaves.
#[test]
fn hook_with_a_wrong_shape_changes_nothing() {
    let a = leaf(&[1.0, 2.0]);
    let b = leaf(&[3.0, 4.0]);
    let c = leaf(&[5.0, 6.0]);
    // Give every leaf an existing .grad.
    a.add(&b).unwrap().add(&c).unwrap().sum_all().unwrap().backward().unwrap();
    let before = [grad_of(&a), grad_of(&b), grad_of(&c)];
    assert_eq!(before, [vec![1.0; 2], vec![1.0; 2], vec![1.0; 2]]);

    // loss = sum(a*b) + sum(c*c): all three leaves are reached; a's hook misbehaves.
    let misbehave = Arc::new(AtomicBool::new(true));
    let m = misbehave.clone();
    a.register_hook(move |g| {
        if m.load(Ordering::SeqCst) { Some(Tensor::zeros([3], DType::F32, g.device()).unwrap()) } else { None }
    })
    .unwrap();
    let loss = a.mul(&b).unwrap().sum_all().unwrap().add(c.mul(&c).unwrap().sum_all().unwrap()).unwrap();
    let err = loss.backward().unwrap_err();
    match &err {
        Error::GradientMismatch { expected, got, .. } => {
            assert_eq!(expected.shape.dims(), &[2]);
            assert_eq!(got.shape.dims(), &[3]);
        }
        e => panic!("expected GradientMismatch, got {e:?}"),
    }
    message(&err, &["hook", "same shape"]);
    assert_eq!([grad_of(&a), grad_of(&b), grad_of(&c)], before, "a failed backward leaves every .grad as it was");

    // Nothing was released: once the hook behaves, the same graph backwards fine.
    misbehave.store(false, Ordering::SeqCst);
    loss.backward().unwrap();
    assert_eq!(grad_of(&a), vec![1.0 + 3.0, 1.0 + 4.0]); // + b
    assert_eq!(grad_of(&b), vec![1.0 + 1.0, 1.0 + 2.0]); // + a
    assert_eq!(grad_of(&c), vec![1.0 + 10.0, 1.0 + 12.0]); // + 2c
}

#[test]
fn hook_on_an_intermediate_with_a_wrong_shape() {
    let x = leaf(&[1.0, 2.0]);
    let y = leaf(&[3.0, 4.0]);
    let h = x.mul(2.0).unwrap();
    h.register_hook(|g| Some(g.sum_all().unwrap())).unwrap(); // [] instead of [2]
    let loss = h.mul(&y).unwrap().sum_all().unwrap();
    let err = loss.backward().unwrap_err();
    assert!(matches!(err, Error::GradientMismatch { .. }), "{err:?}");
    message(&err, &["hook"]);
    assert!(x.grad().is_none());
    assert!(y.grad().is_none(), "y was reached before the failure but gets nothing");
    // Same through grad().
    let err = wgrad::grad(&[&loss], &[&x, &y], None, BackwardOptions::default()).unwrap_err();
    assert!(matches!(err, Error::GradientMismatch { .. }), "{err:?}");
}

#[test]
fn seed_gradient_of_the_wrong_shape() {
    let x = leaf(&[1.0, 2.0, 3.0]);
    let y = x.mul(&x).unwrap();
    let seed = f32s(&[1.0, 1.0], &[2]);
    let err = y.backward_with(&seed, BackwardOptions::default()).unwrap_err();
    match &err {
        Error::SeedMismatch { expected, got } => {
            assert_eq!(expected.shape.dims(), &[3]);
            assert_eq!(got.shape.dims(), &[2]);
        }
        e => panic!("expected SeedMismatch, got {e:?}"),
    }
    message(&err, &["seed", "[3]", "[2]"]);
    // Wrong dtype is a seed mismatch too.
    let seed = Tensor::from_slice(&[1i32, 1, 1], [3], &device()).unwrap();
    assert!(matches!(y.backward_with(&seed, BackwardOptions::default()), Err(Error::SeedMismatch { .. })));
    // And through grad().
    let seed = f32s(&[1.0], &[1]);
    assert!(matches!(
        wgrad::grad(&[&y], &[&x], Some(&[seed]), BackwardOptions::default()),
        Err(Error::SeedMismatch { .. })
    ));
    assert!(x.grad().is_none());
    // Nothing was released: a correct seed works.
    y.backward_with(&f32s(&[1.0; 3], &[3]), BackwardOptions::default()).unwrap();
    assert_eq!(grad_of(&x), vec![2.0, 4.0, 6.0]);
}

#[test]
fn grad_outputs_count_mismatch() {
    let x = leaf(&[1.0]);
    let y = x.mul(2.0).unwrap();
    let err = wgrad::grad(&[&y], &[&x], Some(&[]), BackwardOptions::default()).unwrap_err();
    assert!(matches!(err, Error::InvalidArgument { op: "grad", .. }), "{err:?}");
    message(&err, &["grad_outputs"]);
}

#[test]
fn set_grad_with_the_wrong_shape() {
    let x = leaf(&[1.0, 2.0]);
    x.set_grad(Some(f32s(&[5.0, 6.0], &[2]))).unwrap();
    let err = x.set_grad(Some(f32s(&[1.0], &[1]))).unwrap_err();
    assert!(matches!(err, Error::SetGradMismatch { .. }), "{err:?}");
    message(&err, &["set_grad", "[2]", "[1]", "shape, dtype and device"]);
    assert!(!err.to_string().contains("hook"), "{err}");
    assert_eq!(grad_of(&x), vec![5.0, 6.0]);
    let plain = f32s(&[1.0], &[1]);
    assert!(matches!(plain.set_grad(None), Err(Error::InvalidArgument { op: "set_grad", .. })));
}

// ------------------------------------------------------------------ known library bugs

/// Absurd shapes whose element or byte count overflows are refused, not wrapped.
#[test]
fn shape_whose_size_overflows_is_too_large() {
    for shape in [vec![1usize << 40, 1 << 40], vec![1usize << 62]] {
        let r = Tensor::zeros(shape.clone(), DType::F32, &device());
        // Refused at the call: dims that multiply past 2^63, or more elements than kernels index.
        let err = r.unwrap_err();
        assert!(matches!(err, Error::InvalidArgument { op: "full", .. }), "{shape:?}: {err:?}");
        message(&err, &["shape", "split"]);
    }
}

/// A range whose end overflows is refused, not wrapped into an out-of-bounds view.
#[test]
fn narrow_with_an_overflowing_range() {
    let x = Tensor::zeros([2, 3], DType::F32, &device()).unwrap();
    assert!(matches!(x.narrow(1, usize::MAX, 2), Err(Error::InvalidArgument { op: "narrow", .. })));
}

// ------------------------------------------------------------------ messages name the op and the fix

/// Each message names the op the user called, says what was wrong, and
/// what to do, rather than an internal op or the wrong rule.
#[test]
fn messages_name_the_called_op_and_its_rule() {
    let d = device();
    let zeros = |shape: &[usize]| Tensor::zeros(shape.to_vec(), DType::F32, &d).unwrap();
    // cat: its own rule, not broadcasting.
    let err = wgrad::cat(&[&zeros(&[2, 3]), &zeros(&[2, 4])], 0).unwrap_err();
    message(&err, &["cat", "[2, 3]", "[2, 4]", "same dims except the one joined along"]);
    assert!(!err.to_string().contains("broadcast together"), "{err}");
    // conv2d: channels, and a wrong bias named as such (not an internal reshape).
    let img = zeros(&[1, 3, 5, 5]);
    let err = img.conv2d(&zeros(&[4, 2, 3, 3]), None, Default::default()).unwrap_err();
    message(&err, &["conv2d", "[1, 3, 5, 5]", "[4, 2, 3, 3]", "same c"]);
    let err = img.conv2d(&zeros(&[4, 3, 3, 3]), Some(&zeros(&[3])), Default::default()).unwrap_err();
    message(&err, &["conv2d", "bias", "[out_channels]", "[3]"]);
    assert!(!err.to_string().contains("reshape"), "{err}");
    // softmax over a dim that does not exist names softmax, not max.
    let err = zeros(&[2, 3]).softmax(2).unwrap_err();
    message(&err, &["softmax", "axis 2", "rank 2"]);
    assert!(!err.to_string().starts_with("max"), "{err}");
    // A seed of the wrong dtype says how to fix it.
    let x = f32s(&[1.0, 2.0], &[2]).requires_grad(true).unwrap();
    let y = x.mul(2.0).unwrap();
    let seed = Tensor::ones([2], DType::I32, &d).unwrap();
    let err = y.backward_with(&seed, BackwardOptions::default()).unwrap_err();
    message(&err, &["seed", "I32", "F32", "to_dtype"]);
    // mse_loss and gather state their rules.
    message(&zeros(&[2]).mse_loss(&zeros(&[3]), wgrad::Reduction::Mean).unwrap_err(), &["mse_loss", "same shape"]);
    let idx = Tensor::from_slice(&[0i32, 1], [2], &d).unwrap();
    message(&zeros(&[2, 2]).gather(0, &idx).unwrap_err(), &["gather", "the index must have the input's rank"]);
    // Optimizer hyper-parameters name the constructor and the parameter.
    let p = f32s(&[1.0], &[1]).requires_grad(true).unwrap();
    let err = wgrad::Adam::with(std::slice::from_ref(&p), 0.1, (0.9, 1.5), 1e-8, 0.0).err().unwrap();
    message(&err, &["Adam::new", "beta2", "[0, 1)"]);
}
