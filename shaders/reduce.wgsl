// Reduction over the middle axis of a contiguous [A, K, B] view.
// The prelude defines `T`, `fn identity() -> T` and `fn combine(a: T, b: T) -> T`.
//
// Each invocation produces one element of [A, n_chunks, B]: it combines
// the K elements of its chunk. When n_chunks > 1 the host reduces the
// partial results again with the same kernel, so huge reductions stay
// parallel and never depend on one workgroup walking a million elements.
// Chunk c's j-th element is at k = c * c_stride + j * j_stride: interleaved
// (c_stride = 1) when B == 1, so neighbouring invocations read neighbouring
// elements; blocked (j_stride = 1) otherwise, where B already is.

struct Params {
    a: u32,
    k: u32,
    b: u32,
    n_chunks: u32,
    c_stride: u32,
    j_stride: u32,
    j_count: u32,
    in_offset: u32,
    n_out: u32,
}

@group(0) @binding(0) var<uniform> params: Params;
@group(0) @binding(1) var<storage, read> src: array<T>;
@group(0) @binding(2) var<storage, read_write> dst: array<T>;

@compute @workgroup_size(256)
fn main(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let o = gid.x + gid.y * nwg.x * 256u;
    if (o >= params.n_out) {
        return;
    }
    let b = o % params.b;
    let t = o / params.b;
    let c = t % params.n_chunks;
    let a = t / params.n_chunks;
    let base = params.in_offset + a * params.k * params.b + b;
    var acc = identity();
    for (var j = 0u; j < params.j_count; j = j + 1u) {
        let k = c * params.c_stride + j * params.j_stride;
        if (k >= params.k) {
            break;
        }
        acc = combine(acc, src[base + k * params.b]);
    }
    dst[o] = acc;
}
