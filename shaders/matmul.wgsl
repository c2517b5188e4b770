// Batched matmul C[b] = A[b] @ B[b] over strided views of A and B (so
// transposed and broadcast operands need no copy); C is contiguous.
// The prelude defines `T`.
//
// A 64x64 tile of C per workgroup of 16x16 invocations; each invocation
// accumulates a 4x4 block in registers, reading 16-deep slices of A and B
// staged in workgroup memory.

struct Params {
    m: u32,
    n: u32,
    k: u32,
    a_offset: u32,
    a_batch: u32,
    a_row: u32,
    a_col: u32,
    b_offset: u32,
    b_batch: u32,
    b_row: u32,
    b_col: u32,
    // Workgroup ids are offset by these when a grid is split to respect
    // the per-dimension dispatch limit.
    base_x: u32,
    base_y: u32,
    base_z: u32,
}

@group(0) @binding(0) var<uniform> params: Params;
@group(0) @binding(1) var<storage, read> a: array<T>;
@group(0) @binding(2) var<storage, read> b: array<T>;
@group(0) @binding(3) var<storage, read_write> c: array<T>;

const TILE: u32 = 64u;
const DEPTH: u32 = 16u;

var<workgroup> a_tile: array<array<T, 64>, 16>;
var<workgroup> b_tile: array<array<T, 64>, 16>;

@compute @workgroup_size(16, 16)
fn main(
    @builtin(workgroup_id) wg: vec3<u32>,
    @builtin(local_invocation_id) lid: vec3<u32>,
    @builtin(local_invocation_index) li: u32,
) {
    let batch = wg.z + params.base_z;
    let row0 = (wg.y + params.base_y) * TILE;
    let col0 = (wg.x + params.base_x) * TILE;
    let a_base = params.a_offset + batch * params.a_batch;
    let b_base = params.b_offset + batch * params.b_batch;

    var acc: array<array<T, 4>, 4>;
    for (var i = 0u; i < 4u; i = i + 1u) {
        for (var j = 0u; j < 4u; j = j + 1u) {
            acc[i][j] = T(0);
        }
    }

    for (var k0 = 0u; k0 < params.k; k0 = k0 + DEPTH) {
        // 64x16 elements of each operand, four per invocation.
        for (var l = 0u; l < 4u; l = l + 1u) {
            let e = li + l * 256u;
            let m = e / DEPTH;
            let ka = e % DEPTH;
            var va = T(0);
            if (row0 + m < params.m && k0 + ka < params.k) {
                va = a[a_base + (row0 + m) * params.a_row + (k0 + ka) * params.a_col];
            }
            a_tile[ka][m] = va;
            let kb = e / TILE;
            let n = e % TILE;
            var vb = T(0);
            if (k0 + kb < params.k && col0 + n < params.n) {
                vb = b[b_base + (k0 + kb) * params.b_row + (col0 + n) * params.b_col];
            }
            b_tile[kb][n] = vb;
        }
        workgroupBarrier();
        for (var kk = 0u; kk < DEPTH; kk = kk + 1u) {
            var ra: array<T, 4>;
            var rb: array<T, 4>;
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

    let c_base = batch * params.m * params.n;
    for (var i = 0u; i < 4u; i = i + 1u) {
        let row = row0 + lid.y + i * 16u;
        for (var j = 0u; j < 4u; j = j + 1u) {
            let col = col0 + lid.x + j * 16u;
            if (row < params.m && col < params.n) {
                c[c_base + row * params.n + col] = acc[i][j];
            }
        }
    }
}
