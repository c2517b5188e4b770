// Batched matmul without workgroup memory, for CPU adapters (lavapipe):
// their invocations run as a loop inside each workgroup and every barrier
// splits it, so the tiled kernel's staging costs more than it saves; a
// CPU's caches do the reuse instead. Each invocation accumulates a 4x4
// block of C (4 rows, 4 columns 8 apart), reading A and B straight from
// their strided views.
//
// Same interface as matmul.wgsl: `T`, the bindings (`a`, `b`, `out0`, the
// epilogue's in0..), `M` and `epilogue(acc, i)` come from the generator;
// words from M: m, n, k, a_offset, a_batch, a_row, a_col, b_offset,
// b_batch, b_row, b_col, base_x, base_y, base_z. A workgroup covers a
// 32x32 tile.

@compute @workgroup_size(8, 8)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    let batch = wg.z + p(M + 13u);
    // Rows row0..row0+3; columns col0, col0 + 8, col0 + 16, col0 + 24, so
    // neighbouring invocations (SIMD lanes on a CPU) read neighbouring
    // elements of B and the same elements of A.
    let row0 = (wg.y + p(M + 12u)) * 32u + lid.y * 4u;
    let col0 = (wg.x + p(M + 11u)) * 32u + lid.x;
    let m = p(M + 0u);
    let n = p(M + 1u);
    let k = p(M + 2u);
    if (row0 >= m || col0 >= n) {
        return;
    }
    let a_base = p(M + 3u) + batch * p(M + 4u);
    let b_base = p(M + 7u) + batch * p(M + 8u);
    let a_row = p(M + 5u);
    let a_col = p(M + 6u);
    let b_row = p(M + 9u);
    let b_col = p(M + 10u);
    var rows: array<u32, 4>;
    var cols: array<u32, 4>;
    for (var i = 0u; i < 4u; i = i + 1u) {
        rows[i] = a_base + min(row0 + i, m - 1u) * a_row;
        cols[i] = b_base + min(col0 + 8u * i, n - 1u) * b_col;
    }
    var acc: array<array<T, 4>, 4>;
    for (var i = 0u; i < 4u; i = i + 1u) {
        for (var j = 0u; j < 4u; j = j + 1u) {
            acc[i][j] = T(0);
        }
    }
    for (var kk = 0u; kk < k; kk = kk + 1u) {
        let b_off = kk * b_row;
        let a_off = kk * a_col;
        let b0 = b[cols[0] + b_off];
        let b1 = b[cols[1] + b_off];
        let b2 = b[cols[2] + b_off];
        let b3 = b[cols[3] + b_off];
        for (var i = 0u; i < 4u; i = i + 1u) {
            let va = a[rows[i] + a_off];
            acc[i][0] = acc[i][0] + va * b0;
            acc[i][1] = acc[i][1] + va * b1;
            acc[i][2] = acc[i][2] + va * b2;
            acc[i][3] = acc[i][3] + va * b3;
        }
    }
    let c_base = batch * m * n;
    for (var i = 0u; i < 4u; i = i + 1u) {
        for (var j = 0u; j < 4u; j = j + 1u) {
            let row = row0 + i;
            let col = col0 + 8u * j;
            if (row < m && col < n) {
                let at = c_base + row * n + col;
                out0[at] = epilogue(acc[i][j], at);
            }
        }
    }
}
