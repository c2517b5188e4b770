
// Reduction main. The generator defines above: `T`, `identity()`,
// `combine(a, b)`, `store_out(t, v)`, which stores result t, and
// `fold(acc, a, kk)`, which combines step (a, kk) of an [A, K] iteration
// space whose last axis is reduced into acc: element i = a * K + kk
// (`value(a, kk)`), or for a vectorised reduction the vec4 of elements
// 4i .. 4i + 3 (`value4(a, kk)`, K then counting vec4s). Passing a and kk,
// not i, lets views that are affine in them read without dividing. Template words from R: A, K, n_chunks, j_count
// (= ceil(K / n_chunks)), n_out (= A * n_chunks).
//
// Invocation t produces partial result (a, c) of [A, n_chunks]: chunk c
// holds elements c, c + n_chunks, c + 2 n_chunks, ... of its row, so
// neighbouring invocations read neighbouring elements. When n_chunks > 1
// the host reduces the partials again, so a huge reduction stays parallel
// instead of one invocation walking a million elements.
@compute @workgroup_size(256)
fn main(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let t = gid.x + gid.y * nwg.x * 256u;
    if (t >= p(R + 4u)) {
        return;
    }
    let k = p(R + 1u);
    let chunks = p(R + 2u);
    let a = t / chunks;
    let c = t % chunks;
    var acc = identity();
    for (var j = 0u; j < p(R + 3u); j = j + 1u) {
        let kk = j * chunks + c;
        if (kk >= k) {
            break;
        }
        acc = fold(acc, a, kk);
    }
    store_out(t, acc);
}
