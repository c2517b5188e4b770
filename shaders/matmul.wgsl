// Batched matmul C[b] = A[b] @ B[b] over strided views of A and B (so
// transposed and broadcast operands need no copy); C is contiguous.
//
// A 64x64 tile of C per workgroup of 16x16 invocations; each invocation
// accumulates a 4x4 block in registers, reading 16-deep slices of A and B
// staged in workgroup memory.

// The generator defines above: `T`, the element type, `A`, the type
// products accumulate in (f32 for f16), the accessors of the operands
// (`load_a(i)`, `load_b(i)`: element i of A's and B's buffers, as `A`) and of the
// result (`store_out(i, v)`, `load_out(i)`: element i of C, at C's offset
// in its buffer), whatever the epilogue reads, `M` (where this
// template's words start) and `epilogue(acc, i)`, the elementwise function
// applied to element i of the result before it is stored (the identity for
// a plain matmul, e.g. `acc * mask` when the compiler fuses a consumer).
// Words from M: m, n, k, a_offset, a_batch, a_row, a_col, b_offset,
// b_batch, b_row, b_col, then base_x, base_y, base_z: workgroup ids are
// offset by these when a grid is split to respect the per-dimension
// dispatch limit.

const TILE: u32 = 64u;
const DEPTH: u32 = 16u;

var<workgroup> a_tile: array<array<A, 64>, 16>;
var<workgroup> b_tile: array<array<A, 64>, 16>;

@compute @workgroup_size(16, 16)
fn main(
    @builtin(workgroup_id) wg: vec3<u32>,
    @builtin(local_invocation_id) lid: vec3<u32>,
    @builtin(local_invocation_index) li: u32,
) {
    let batch = wg.z + p(M + 13u);
    let row0 = (wg.y + p(M + 12u)) * TILE;
    let col0 = (wg.x + p(M + 11u)) * TILE;
    let a_base = p(M + 3u) + batch * p(M + 4u);
    let b_base = p(M + 7u) + batch * p(M + 8u);

    var acc: array<array<A, 4>, 4>;
    for (var i = 0u; i < 4u; i = i + 1u) {
        for (var j = 0u; j < 4u; j = j + 1u) {
            acc[i][j] = A(0);
        }
    }

    for (var k0 = 0u; k0 < p(M + 2u); k0 = k0 + DEPTH) {
        // 64x16 elements of each operand, four per invocation.
        for (var l = 0u; l < 4u; l = l + 1u) {
            let e = li + l * 256u;
            let m = e / DEPTH;
            let ka = e % DEPTH;
            var va = A(0);
            if (row0 + m < p(M + 0u) && k0 + ka < p(M + 2u)) {
                va = load_a(a_base + (row0 + m) * p(M + 5u) + (k0 + ka) * p(M + 6u));
            }
            a_tile[ka][m] = va;
            let kb = e / TILE;
            let n = e % TILE;
            var vb = A(0);
            if (k0 + kb < p(M + 2u) && col0 + n < p(M + 1u)) {
                vb = load_b(b_base + (k0 + kb) * p(M + 9u) + (col0 + n) * p(M + 10u));
            }
            b_tile[kb][n] = vb;
        }
        workgroupBarrier();
        for (var kk = 0u; kk < DEPTH; kk = kk + 1u) {
            var ra: array<A, 4>;
            var rb: array<A, 4>;
            for (var i = 0u; i < 4u; i = i + 1u) {
                ra[i] = a_tile[kk][lid.y + i * 16u];
                rb[i] = b_tile[kk][lid.x + i * 16u];
            }
            for (var i = 0u; i < 4u; i = i + 1u) {
                for (var j = 0u; j < 4u; j = j + 1u) {
                    acc[i][j] = acc[i][j] + ra[i] * rb[j];
                }
            }
        }
        workgroupBarrier();
    }

    let c_base = batch * p(M + 0u) * p(M + 1u);
    for (var i = 0u; i < 4u; i = i + 1u) {
        let row = row0 + lid.y + i * 16u;
        for (var j = 0u; j < 4u; j = j + 1u) {
            let col = col0 + lid.x + j * 16u;
            if (row < p(M + 0u) && col < p(M + 1u)) {
                let at = c_base + row * p(M + 1u) + col;
                store_out(at, epilogue(acc[i][j], at));
            }
        }
    }
}
