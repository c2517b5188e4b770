// Helpers shared by every generated elementwise kernel.

fn p(i: u32) -> u32 {
    return params.v[i / 4u][i % 4u];
}

// Element offset of linear output index `i` in a strided view whose offset
// and strides start at word `base` (rank at word 1, output shape at 2..10).
// The loop runs `rank` (at most 8) times; llvmpipe ends an invocation after
// 65,535 loop back-edges in total, so a reduction, which calls this once
// per element it folds, counts these in its budget (`reduce_chunks`).
// (Written out for the 8 dims instead, this was 1.4-1.9x slower on lavapipe.)
fn strided(base: u32, i: u32) -> u32 {
    var rem = i;
    var off = p(base);
    for (var d = p(1u); d > 0u; d = d - 1u) {
        let size = p(1u + d);
        off = off + (rem % size) * p(base + d);
        rem = rem / size;
    }
    return off;
}

// NaN tests on the bits: WGSL lets an implementation assume floats are
// never NaN, so `x != x` may be folded to false. (f16 is widened first;
// widening keeps NaN.)
fn wgrad_isnan(x: f32) -> bool {
    return (bitcast<u32>(x) & 0x7fffffffu) > 0x7f800000u;
}

// Whether `a + b` and `a - b` are NaN in IEEE arithmetic (a NaN operand, or
// infinities that cancel), decided on the bits. The same assumption lets a
// driver fold `x - x` and `x + (-x)` to 0 (llvmpipe does, in one kernel or
// across fused ops), where PyTorch gives NaN for an infinite or NaN x; a
// sum or difference selects NaN where these say so.
fn wgrad_sum_is_nan(a: f32, b: f32) -> bool {
    let ua = bitcast<u32>(a);
    let cancel = (ua & 0x7fffffffu) == 0x7f800000u && (bitcast<u32>(b) ^ 0x80000000u) == ua;
    return wgrad_isnan(a) || wgrad_isnan(b) || cancel;
}

fn wgrad_difference_is_nan(a: f32, b: f32) -> bool {
    let ua = bitcast<u32>(a);
    let cancel = (ua & 0x7fffffffu) == 0x7f800000u && bitcast<u32>(b) == ua;
    return wgrad_isnan(a) || wgrad_isnan(b) || cancel;
}

// The logistic function with one exp: e = exp(-|x|) never overflows, and
// each branch is the accurate one for its sign (e / (1 + e) keeps the
// subnormal results of very negative x). NaN stays NaN.
fn wgrad_sigmoid(x: f32) -> f32 {
    let e = exp(-abs(x));
    return select(e / (1.0 + e), 1.0 / (1.0 + e), x >= 0.0);
}

// erf, Abramowitz & Stegun 7.1.26 (absolute error below 1.5e-7).
fn wgrad_erf(x: f32) -> f32 {
    let t = 1.0 / (1.0 + 0.3275911 * abs(x));
    let y = 1.0 - (((((1.061405429 * t - 1.453152027) * t) + 1.421413741) * t - 0.284496736) * t + 0.254829592) * t * exp(-x * x);
    return select(-y, y, x >= 0.0);
}

// log(1 + u) for u >= 0, accurate for tiny u (WGSL has no log1p). Near 0
// a five-term series (error below u^6 / 6, relatively 3e-9 at u = 0.05):
// log of a value near 1 loses relative precision in some drivers (llvmpipe).
fn wgrad_log1p(u: f32) -> f32 {
    if (u < 0.05) {
        return u * (1.0 - u * (0.5 - u * (1.0 / 3.0 - u * (0.25 - u * 0.2))));
    }
    return log(1.0 + u);
}

// pow with PyTorch's conventions: x^0 = 1, negative bases with integral
// exponents keep their sign, negative bases with fractional exponents are NaN.
fn wgrad_pow(x: f32, y: f32) -> f32 {
    // C's and PyTorch's pow: x^0 = 1 and 1^y = 1 even for NaN; otherwise a
    // NaN operand gives NaN (some drivers' pow(NaN, 2) is 0).
    if (y == 0.0 || x == 1.0) {
        return 1.0;
    }
    if (wgrad_isnan(x) || wgrad_isnan(y)) {
        return bitcast<f32>(0x7fc00000u);
    }
    var r = pow(abs(x), y);
    // WGSL leaves pow(0, y <= 0) undefined (lavapipe returns 0 for 0^-1);
    // spell out 0^y: 0 for y > 0, +inf for y < 0 (y == 0 is handled below).
    if (x == 0.0) {
        r = select(0.0, bitcast<f32>(0x7f800000u), y < 0.0);
    }
    let odd = abs(y % 2.0) == 1.0;
    let integral = fract(y) == 0.0;
    var out = select(r, -r, x < 0.0 && odd);
    if (x < 0.0 && !integral) {
        out = bitcast<f32>(0x7fc00000u);
    }
    return select(out, 1.0, y == 0.0);
}

// PCG hash (Jarzynski & Olano 2020).
fn wgrad_hash(v: u32) -> u32 {
    let state = v * 747796405u + 2891336453u;
    let word = ((state >> ((state >> 28u) + 4u)) ^ state) * 277803737u;
    return (word >> 22u) ^ word;
}

fn wgrad_uniform(i: u32, seed_lo: u32, seed_hi: u32) -> f32 {
    let h = wgrad_hash(wgrad_hash(i ^ wgrad_hash(seed_lo)) + seed_hi);
    return f32(h >> 8u) * (1.0 / 16777216.0);
}

fn wgrad_normal(i: u32, seed_lo: u32, seed_hi: u32) -> f32 {
    let u1 = wgrad_uniform(2u * i, seed_lo, seed_hi);
    let u2 = wgrad_uniform(2u * i + 1u, seed_lo, seed_hi);
    return sqrt(-2.0 * log(1.0 - u1)) * cos(6.283185307179586 * u2);
}
