
// Column reduction main: four neighbouring results per invocation. The
// generator defines above `T`, `identity()`, `combine(a, b)`,
// `store_out(t, v)` as for `reduce.wgsl`, and `fold4(acc, a4, kk)`, which
// combines step kk of results a4 .. a4 + 3 into acc (one vec4 load where
// the four read neighbouring elements, one scalar where they read the
// same). Template words from R: A / 4, K, n_chunks, j_count
// (= ceil(K / n_chunks)), n_out (= A / 4 * n_chunks).
//
// Invocation t folds chunk c of results a4 .. a4 + 3 (a4 = 4 (t / n_chunks)):
// elements c, c + n_chunks, ... of each, as `reduce.wgsl` does for one.
// 64 invocations a workgroup: a few hundred columns still make several
// workgroups, which a CPU adapter runs on different cores.
@compute @workgroup_size(64)
fn main(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let t = gid.x + gid.y * nwg.x * 64u;
    if (t >= p(R + 4u)) {
        return;
    }
    let k = p(R + 1u);
    let chunks = p(R + 2u);
    let a4 = (t / chunks) * 4u;
    let c = t % chunks;
    var acc = array<T, 4>(identity(), identity(), identity(), identity());
    for (var j = 0u; j < p(R + 3u); j = j + 1u) {
        let kk = j * chunks + c;
        if (kk >= k) {
            break;
        }
        acc = fold4(acc, a4, kk);
    }
    store_out(a4 * chunks + c, acc[0]);
    store_out((a4 + 1u) * chunks + c, acc[1]);
    store_out((a4 + 2u) * chunks + c, acc[2]);
    store_out((a4 + 3u) * chunks + c, acc[3]);
}
