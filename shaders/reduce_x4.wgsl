
// reduce.wgsl, four elements at a time: `value4(q)` (generated) is the
// vec4 of elements 4q .. 4q + 3 of the [A, K] iteration space, K a
// multiple of 4, its contiguous inputs loaded as vec4s (llvmpipe loads
// storage one scalar per SIMD lane in a loop; a vec4 shares that loop four
// ways). Template words from R: A, K / 4, n_chunks, j_count
// (= ceil(K / 4 / n_chunks)), n_out (= A * n_chunks). Chunk c of row a
// holds vec4s c, c + n_chunks, ... of its row.
@compute @workgroup_size(256)
fn main(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let t = gid.x + gid.y * nwg.x * 256u;
    if (t >= p(R + 4u)) {
        return;
    }
    let k4 = p(R + 1u);
    let chunks = p(R + 2u);
    let a = t / chunks;
    let c = t % chunks;
    var acc = identity();
    for (var j = 0u; j < p(R + 3u); j = j + 1u) {
        let kk = j * chunks + c;
        if (kk >= k4) {
            break;
        }
        let v = value4(a * k4 + kk);
        acc = combine(combine(acc, v.x), combine(v.y, combine(v.z, v.w)));
    }
    out0[t] = acc;
}
