// Batched matmul for CPU adapters (lavapipe), without workgroup memory.
//
// llvmpipe runs 8 invocations as the lanes of one SIMD vector, but each
// storage-buffer load is a loop over the lanes with a bounds check per
// scalar. Loads, not multiply-adds, are the cost, so each invocation keeps
// a 16x8 block of C in registers (spilling is cheaper than loading): per
// step of k it loads 16 values of A and 8 of B for 128 multiply-adds.
// Columns of a block are 8 apart so neighbouring lanes read neighbouring
// elements of B. No workgroup memory: barriers split llvmpipe's invocation
// loop, and its caches do the reuse instead.
//
// The block is spelled out by the generator (`codegen::direct_template`)
// at the `//!` markers: llvmpipe leaves loops of this size rolled, and an
// array of accumulators indexed in a loop lives in memory, not registers.
//
// Same interface as matmul.wgsl: `T`, `A` (the accumulator type, f32 for
// f16), the accessors (`load_a`, `load_b` returning `A`, `store_out`,
// `load_out`), `M` and `epilogue(acc: A, i)` come from the generator;
// words from M: m, n, k, a_offset, a_batch, a_row, a_col, b_offset,
// b_batch, b_row, b_col, base_x, base_y, base_z. A workgroup covers a
// 64x64 tile.

@compute @workgroup_size(8, 4)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    let batch = wg.z + p(M + 13u);
    let row0 = (wg.y + p(M + 12u)) * 64u + lid.y * 16u;
    let col0 = (wg.x + p(M + 11u)) * 64u + lid.x;
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
    // Out-of-range rows and columns are clamped on load, skipped on store:
    // rI = a_base + min(row0 + I, m - 1) * a_row, cJ likewise, accIJ = 0.
    //! declare
    for (var kk = 0u; kk < k; kk = kk + 1u) {
        let b_off = kk * b_row;
        let a_off = kk * a_col;
        // vbJ = load_b(cJ + b_off); then per row vaI = load_a(rI + a_off) and
        // accIJ = accIJ + vaI * vbJ.
        //! step
    }
    // The block is stored as is, then (when the generator fused one) run
    // through the epilogue in a loop over the block's elements: an
    // epilogue inlined at each of the 128 stores would multiply the
    // shader compiler's time.
    let c_base = batch * m * n;
    //! store
    //! epilogue
}
