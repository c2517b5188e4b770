//! Every kind of WGSL module the runtime generates, validated by naga:
//! each elementwise op for each dtype it supports, both access modes,
//! multi-output kernels, and the reduce and matmul templates per dtype.

use crate::exec::ReduceKind;
use crate::exec::bind::Binds;
use crate::exec::codegen::{self, MatmulTemplate};
use crate::exec::kernel::{Access, MapKernel, Node, RandomKind};
use crate::metadata::DType;
use crate::ops::binary::BinaryOp;
use crate::ops::compare::CmpOp;
use crate::ops::unary::UnaryOp;

/// A kernel rendered for each binding pattern: one binding per operand,
/// and one binding per dtype (every operand in its dtype's arena: what
/// WebGPU's 8 storage bindings are met with).
struct Rendered(Vec<(&'static str, String)>);

impl Rendered {
    fn first(&self) -> String {
        self.0[0].1.clone()
    }
}

/// The operands' dtypes and writes of an elementwise-shaped kernel,
/// plus `extra` read operands (a matmul's `a` and `b`).
fn operands(k: &MapKernel, extra: &[DType]) -> (Vec<DType>, Vec<bool>) {
    let mut dtypes: Vec<DType> = k.inputs.iter().map(|(d, _)| *d).collect();
    let mut written = vec![false; dtypes.len()];
    for (id, _) in &k.outputs {
        dtypes.push(k.dtype(*id));
        written.push(true);
    }
    dtypes.extend_from_slice(extra);
    written.extend(extra.iter().map(|_| false));
    (dtypes, written)
}

fn rendered(k: &MapKernel, extra: &[DType], f: impl Fn(&Binds) -> String) -> Rendered {
    let (dtypes, written) = operands(k, extra);
    Rendered(vec![
        ("separate", f(&Binds::separate(&dtypes, &written))),
        ("by dtype", f(&Binds::by_dtype(&dtypes, &written))),
    ])
}

fn render(k: &MapKernel) -> Rendered {
    rendered(k, &[], |b| codegen::render(k, b))
}

fn render_x4(k: &MapKernel) -> Rendered {
    rendered(k, &[], |b| codegen::render_x4(k, b))
}

fn render_reduce(k: &MapKernel, kind: ReduceKind) -> Rendered {
    rendered(k, &[], |b| codegen::render_reduce(k, kind, 1, b))
}

fn render_reduce_x4(k: &MapKernel, kind: ReduceKind) -> Rendered {
    rendered(k, &[], |b| codegen::render_reduce_x4(k, kind, b))
}

fn render_matmul(k: &MapKernel, dtype: DType, template: MatmulTemplate) -> Rendered {
    rendered(k, &[dtype, dtype], |b| codegen::render_matmul(k, dtype, template, b))
}

/// Validates every binding pattern of a kernel; the arena pattern binds
/// at most one storage buffer per dtype, within WebGPU's 8.
fn validate(label: &str, rendered: &Rendered) {
    for (pattern, source) in &rendered.0 {
        validate_source(&format!("{label} ({pattern})"), source);
        if *pattern == "by dtype" {
            let storage = source.matches("var<storage").count();
            assert!((1..=4).contains(&storage), "{label}: {storage} storage bindings\n{source}");
        }
    }
}

fn validate_source(label: &str, source: &str) {
    let module = naga::front::wgsl::parse_str(source)
        .unwrap_or_else(|e| panic!("{label}: parse error\n{}\n{source}", e.emit_to_string(source)));
    naga::valid::Validator::new(naga::valid::ValidationFlags::all(), naga::valid::Capabilities::all())
        .validate(&module)
        .unwrap_or_else(|e| panic!("{label}: validation error {e:?}\n{source}"));
    // Every uniform word the kernel reads is one it declares.
    crate::exec::codegen::check_uniform_reads(label, source).unwrap_or_else(|e| panic!("{e}\n{source}"));
    let (declared, highest) = crate::exec::codegen::uniform_reads(source);
    assert!(declared > 0 && highest.is_some(), "{label}: no uniform reads found");
}

/// The uniform check sees the template words: a reduction or matmul
/// declared without room for them (as before the check) is refused.
#[test]
fn kernels_that_read_past_their_uniform_are_refused() {
    let mut k = MapKernel::default();
    let x = k.input(DType::F32);
    k.output(x);
    let words = crate::exec::codegen::param_words(&k);
    for (label, source, template_words) in [
        ("reduce", render_reduce(&k, ReduceKind::Sum).first(), crate::exec::codegen::REDUCE_WORDS),
        ("matmul", render_matmul(&k, DType::F32, MatmulTemplate::Tiled).first(), crate::exec::codegen::MATMUL_WORDS),
        (
            "matmul direct",
            render_matmul(&k, DType::F32, MatmulTemplate::Direct).first(),
            crate::exec::codegen::MATMUL_WORDS,
        ),
    ] {
        let (declared, highest) = crate::exec::codegen::uniform_reads(&source);
        assert_eq!(highest, Some(words + template_words - 1), "{label}");
        assert!(declared >= words + template_words, "{label}");
        let short = source.replace(
            &format!("array<vec4<u32>, {}>", declared / 4),
            &format!("array<vec4<u32>, {}>", words.div_ceil(4)),
        );
        assert!(crate::exec::codegen::check_uniform_reads(label, &short).is_err(), "{label}");
    }
}

const UNARY: [UnaryOp; 14] = [
    UnaryOp::Neg,
    UnaryOp::Exp,
    UnaryOp::Log,
    UnaryOp::Sqrt,
    UnaryOp::Rsqrt,
    UnaryOp::Tanh,
    UnaryOp::Sigmoid,
    UnaryOp::Relu,
    UnaryOp::Sin,
    UnaryOp::Cos,
    UnaryOp::Abs,
    UnaryOp::Erf,
    UnaryOp::Sign,
    UnaryOp::Softplus,
];
const BINARY: [BinaryOp; 8] = [
    BinaryOp::Add,
    BinaryOp::Sub,
    BinaryOp::Mul,
    BinaryOp::Div,
    BinaryOp::FloorDiv,
    BinaryOp::Pow,
    BinaryOp::Maximum,
    BinaryOp::Minimum,
];
const CMP: [CmpOp; 6] = [CmpOp::Eq, CmpOp::Ne, CmpOp::Lt, CmpOp::Le, CmpOp::Gt, CmpOp::Ge];
const DTYPES: [DType; 4] = [DType::F32, DType::F16, DType::I32, DType::U32];

/// The vectorised rendering (its outputs are always contiguous).
fn x4(k: &MapKernel) -> Rendered {
    let mut k = k.clone();
    for output in &mut k.outputs {
        output.1 = Access::Linear;
    }
    render_x4(&k)
}

fn with_access(mut k: MapKernel, access: Access) -> MapKernel {
    for input in &mut k.inputs {
        input.1 = access;
    }
    for output in &mut k.outputs {
        output.1 = access;
    }
    k
}

#[test]
fn unary_kernels_validate() {
    for op in UNARY {
        for dtype in DTYPES.into_iter().filter(|&d| op.supports(d)) {
            let mut k = MapKernel::default();
            let x = k.input(dtype);
            let y = k.push(Node::Unary(op, x), dtype);
            k.output(y);
            validate(&format!("{op:?} {dtype:?} x4"), &x4(&k));
            let k = with_access(k, Access::Strided);
            validate(&format!("{op:?} {dtype:?}"), &render(&k));
            validate(&format!("{op:?} {dtype:?} strided x4"), &x4(&k));
        }
    }
}

#[test]
fn binary_and_compare_kernels_validate() {
    for dtype in DTYPES {
        for op in BINARY.into_iter().filter(|&op| op.supports(dtype)) {
            for access in [Access::Linear, Access::Strided] {
                let mut k = MapKernel::default();
                let a = k.input(dtype);
                let b = k.scalar(dtype);
                let c = k.push(Node::Binary(op, a, b), dtype);
                k.output(c);
                let k = with_access(k, access);
                validate(&format!("{op:?} {dtype:?} {access:?}"), &render(&k));
                validate(&format!("{op:?} {dtype:?} {access:?} x4"), &x4(&k));
            }
        }
        for op in CMP {
            let mut k = MapKernel::default();
            let a = k.input(dtype);
            let b = k.input(dtype);
            let m = k.push(Node::Compare(op, a, b), DType::U32);
            let s = k.push(Node::Select(m, a, b), dtype);
            k.output(m);
            k.output(s);
            validate(&format!("{op:?} {dtype:?}"), &render(&k));
            validate(&format!("{op:?} {dtype:?} x4"), &x4(&k));
        }
        for to in DTYPES {
            let mut k = MapKernel::default();
            let a = k.input(dtype);
            let c = k.push(Node::Cast(a), to);
            k.output(c);
            validate(&format!("cast {dtype:?} -> {to:?}"), &render(&k));
            validate(&format!("cast {dtype:?} -> {to:?} x4"), &x4(&k));
        }
    }
}

#[test]
fn creation_kernels_validate() {
    for kind in [RandomKind::Uniform, RandomKind::Normal] {
        let mut k = MapKernel::default();
        let slot = k.scalar_slot(DType::U32);
        k.scalar_slot(DType::U32);
        let r = k.push(Node::Random(kind, slot), DType::F32);
        k.output(r);
        validate(&format!("{kind:?}"), &render(&k));
        validate(&format!("{kind:?} x4"), &x4(&k));
        // Seeds read from a device tensor (a compiled step's dropout).
        let mut k = MapKernel::default();
        let b = k.gathered(DType::U32);
        let (zero, one) = (k.scalar(DType::U32), k.scalar(DType::U32));
        let lo = k.push(Node::Gather(b, zero), DType::U32);
        let hi = k.push(Node::Gather(b, one), DType::U32);
        let r = k.push(Node::RandomAt(kind, lo, hi), DType::F32);
        k.output(r);
        validate(&format!("{kind:?} from seeds"), &render(&k));
        validate(&format!("{kind:?} from seeds x4"), &x4(&k));
    }
    let mut k = MapKernel::default();
    let i = k.push(Node::Index, DType::F32);
    let s = k.scalar(DType::F32);
    let y = k.push(Node::Binary(BinaryOp::Mul, i, s), DType::F32);
    k.output(y);
    validate("arange", &render(&k));
    validate("arange x4", &x4(&k));
}

#[test]
fn fused_chain_validates() {
    // A small fused subgraph: tanh(x * a + b) * sigmoid(x), two outputs.
    let mut k = MapKernel::default();
    let x = k.input(DType::F32);
    let a = k.input(DType::F32);
    let b = k.input(DType::F32);
    let xa = k.push(Node::Binary(BinaryOp::Mul, x, a), DType::F32);
    let z = k.push(Node::Binary(BinaryOp::Add, xa, b), DType::F32);
    let t = k.push(Node::Unary(UnaryOp::Tanh, z), DType::F32);
    let s = k.push(Node::Unary(UnaryOp::Sigmoid, x), DType::F32);
    let y = k.push(Node::Binary(BinaryOp::Mul, t, s), DType::F32);
    k.output(y);
    k.output(t);
    validate("fused", &render(&with_access(k.clone(), Access::Strided)));
    validate("fused x4", &x4(&k));
}

#[test]
fn templates_validate() {
    for dtype in DTYPES {
        for kind in [ReduceKind::Sum, ReduceKind::Max, ReduceKind::Min] {
            // A plain reduction reads its input; a fused one computes a prologue.
            let mut plain = MapKernel::default();
            let x = plain.input(dtype);
            plain.output(x);
            validate(&format!("reduce {kind:?} {dtype:?} x4"), &render_reduce_x4(&plain, kind));
            validate(&format!("reduce {kind:?} {dtype:?}"), &render_reduce(&with_access(plain, Access::Strided), kind));
            let mut fused = MapKernel::default();
            let x = fused.input(dtype);
            let y = fused.input(dtype);
            let z = fused.push(Node::Binary(BinaryOp::Mul, x, y), dtype);
            fused.output(z);
            validate(&format!("fused reduce {kind:?} {dtype:?}"), &render_reduce(&fused, kind));
            validate(&format!("fused reduce {kind:?} {dtype:?} x4"), &render_reduce_x4(&fused, kind));
        }
        let mut plain = MapKernel::default();
        let acc = plain.push(Node::Arg, dtype);
        plain.output(acc);
        for template in [MatmulTemplate::Tiled, MatmulTemplate::Direct] {
            validate(&format!("matmul {dtype:?} {template:?}"), &render_matmul(&plain, dtype, template));
        }
        let mut epilogue = MapKernel::default();
        let acc = epilogue.push(Node::Arg, dtype);
        let mask = epilogue.input(dtype);
        let y = epilogue.push(Node::Binary(BinaryOp::Mul, acc, mask), dtype);
        epilogue.output(y);
        let epilogue = with_access(epilogue, Access::Strided);
        for template in [MatmulTemplate::Tiled, MatmulTemplate::Direct] {
            let source = render_matmul(&epilogue, dtype, template);
            validate(&format!("matmul with epilogue {dtype:?} {template:?}"), &source);
        }
    }
}

#[test]
fn row_kernels_validate() {
    use crate::exec::codegen::RowForm;
    for dtype in DTYPES {
        for kind in [ReduceKind::Sum, ReduceKind::Max, ReduceKind::Min] {
            // softmax-like: x - max(x), then exp / sum of it; a row-uniform
            // input (a per-row statistic) and a per-row output too.
            let mut k = MapKernel::default();
            let x = k.input(dtype);
            let per_row = k.input(dtype);
            let m = k.push(Node::RowReduce(kind, x), dtype);
            let d = k.push(Node::Binary(BinaryOp::Sub, x, m), dtype);
            let s = k.push(Node::RowReduce(ReduceKind::Sum, d), dtype);
            let scaled = k.push(Node::Binary(BinaryOp::Mul, s, per_row), dtype);
            let y = k.push(Node::Binary(BinaryOp::Div, d, scaled), dtype);
            k.output(y);
            k.output(scaled);
            for form in [
                RowForm::PerInvocation,
                RowForm::PerInvocationVec4,
                RowForm::Workgroup { size: 64, subgroups: false },
                RowForm::Workgroup { size: 64, subgroups: true },
            ] {
                let io = [false, true, false, true];
                let source = rendered(&k, &[], |b| codegen::render_rows(&k, &io, form, b));
                validate(&format!("rows {kind:?} {dtype:?} {form:?}"), &source);
            }
        }
    }
}

/// A checked row sum ([`Node::CheckedRowSum`]): its fast value, and the
/// loop summing the operand again where that is not trusted, in every form
/// (the row-sums pass makes these, `compiler::row_sums`).
#[test]
fn checked_row_sums_validate() {
    use crate::exec::codegen::RowForm;
    // Σ (x / s) with s = Σ x, distributed as (Σ x) / s.
    let mut k = MapKernel::default();
    let x = k.input(DType::F32);
    let s = k.push(Node::RowReduce(ReduceKind::Sum, x), DType::F32);
    let q = k.push(Node::Binary(BinaryOp::Div, x, s), DType::F32);
    let fast = k.push(Node::Binary(BinaryOp::Div, s, s), DType::F32);
    let absolute = k.push(Node::Unary(UnaryOp::Abs, x), DType::F32);
    let magnitude = k.push(Node::RowReduce(ReduceKind::Sum, absolute), DType::F32);
    let sum =
        k.push(Node::CheckedRowSum { fast, src: q, addends: magnitude, magnitude, smallest: magnitude }, DType::F32);
    let y = k.push(Node::Binary(BinaryOp::Mul, q, sum), DType::F32);
    k.output(y);
    k.output(sum);
    for form in [
        RowForm::PerInvocation,
        RowForm::PerInvocationVec4,
        RowForm::Workgroup { size: 64, subgroups: false },
        RowForm::Workgroup { size: 64, subgroups: true },
    ] {
        let io = [false, false, true];
        let source = rendered(&k, &[], |b| codegen::render_rows(&k, &io, form, b));
        assert!(source.first().contains("0x7f800000u) == 0x7f800000u"), "{}", source.first());
        validate(&format!("checked row sum {form:?}"), &source);
    }
}

#[test]
fn planar_reads_validate() {
    let mut k = MapKernel::default();
    let x = k.input(DType::F32);
    let y = k.input(DType::F32);
    let z = k.push(Node::Binary(BinaryOp::Add, x, y), DType::F32);
    k.output(z);
    validate("planar", &render(&with_access(k.clone(), Access::Planar)));
    validate("planar reduce", &render_reduce(&with_access(k.clone(), Access::Planar), ReduceKind::Sum));
    // Affine in (a, kk): read without dividing, one element or a vec4's
    // four at a time.
    let split = with_access(k, Access::Split);
    validate("split reduce", &render_reduce(&split, ReduceKind::Sum));
    validate("split reduce x4", &render_reduce_x4(&split, ReduceKind::Max));
    let siblings = rendered(&split, &[], |b| codegen::render_reduce(&split, ReduceKind::Sum, 1, b));
    validate("split reduce siblings", &siblings);
}

#[test]
fn sibling_reductions_validate() {
    // Two sums over one iteration, folded as a vec2, and a side output.
    for dtype in [DType::F32, DType::F16] {
        let mut k = MapKernel::default();
        let x = k.input(dtype);
        let y = k.input(dtype);
        let xy = k.push(Node::Binary(BinaryOp::Mul, x, y), dtype);
        k.output(x);
        k.output(xy);
        k.output(xy);
        let source = rendered(&k, &[], |b| codegen::render_reduce(&k, ReduceKind::Sum, 2, b));
        validate(&format!("sibling reductions {dtype:?}"), &source);
    }
}

#[test]
fn batched_segment_sums_validate() {
    // A batched scatter-add (one image's map for every image), and the
    // batched gather that it is the transpose of.
    for dtype in [DType::F32, DType::F16] {
        let mut k = MapKernel::default();
        let values = k.gathered(dtype);
        let starts = k.gathered(DType::U32);
        let positions = k.gathered(DType::U32);
        let v = k.push(Node::SegmentSum { values, starts, positions, batched: true }, dtype);
        k.output(v);
        validate(&format!("batched segment sum {dtype:?}"), &render(&k));
    }
}

#[test]
fn column_reductions_validate() {
    use codegen::ColumnRead;
    for dtype in DTYPES {
        for kind in [ReduceKind::Sum, ReduceKind::Max, ReduceKind::Min] {
            // x (four results' neighbouring elements) * s (one per step,
            // shared) + y (strided, per result), and the product stored as
            // it is walked.
            let mut k = MapKernel::default();
            let x = k.input(dtype);
            let s = k.input(dtype);
            let y = k.input(dtype);
            let xs = k.push(Node::Binary(BinaryOp::Mul, x, s), dtype);
            let z = k.push(Node::Binary(BinaryOp::Add, xs, y), dtype);
            k.output(z);
            k.output(xs);
            k.inputs[0].1 = Access::Split;
            k.inputs[1].1 = Access::Split;
            k.inputs[2].1 = Access::Strided;
            let reads = [ColumnRead::Vec4, ColumnRead::Once, ColumnRead::PerResult];
            let source = rendered(&k, &[], |b| codegen::render_reduce_columns(&k, kind, 1, &reads, b));
            validate(&format!("column reduce {kind:?} {dtype:?}"), &source);
        }
    }
    // Sibling sums (a vec2 per result) over a broadcast and a split input.
    let mut k = MapKernel::default();
    let x = k.input(DType::F32);
    let c = k.input(DType::F32);
    let xc = k.push(Node::Binary(BinaryOp::Mul, x, c), DType::F32);
    k.output(x);
    k.output(xc);
    k.inputs[0].1 = Access::Split;
    k.inputs[1].1 = Access::Broadcast;
    let reads = [ColumnRead::Vec4, ColumnRead::Once];
    let source = rendered(&k, &[], |b| codegen::render_reduce_columns(&k, ReduceKind::Sum, 2, &reads, b));
    validate("column sibling sums", &source);
}
