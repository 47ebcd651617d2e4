// Forward ternary product: y[m][r] = sum_k code(r, k) * x[m][k] for the rows
// of one weight chunk and up to TM tokens per workgroup.
//
// Weights are tern's packed layout read as u32 words: word i of a row holds
// bytes 4(i % 8) .. 4(i % 8) + 3 of group i / 8, and shifting it right by
// 6 - 2s and masking 0x03030303 gives the codes (0, 1, 2) of the 4
// consecutive columns 128 (i / 8) + 32 s + 4 (i % 8) + 0..3. Activations are
// int8 packed four to a word in column order, so the matching word is
// 32 (i / 8) + 8 s + i % 8, and dot4I8Packed multiplies the pair exactly.
// The host subtracts sum(x) to turn codes back into weights.

struct Params {
    rows: u32,       // rows in this chunk (one workgroup each)
    words: u32,      // u32 words per packed row
    tokens: u32,     // tokens in this dispatch
    x_words: u32,    // u32 words per activation row (= 4 * words)
}

@group(0) @binding(0) var<storage, read> w: array<u32>;
@group(0) @binding(1) var<storage, read> x: array<u32>;
@group(0) @binding(2) var<storage, read_write> y: array<i32>;
@group(0) @binding(3) var<uniform> p: Params;

const WG: u32 = 64u;
const TM: u32 = 4u;

var<workgroup> partial: array<array<i32, 4>, 64>;

@compute @workgroup_size(64)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let r = wg.x;
    let m0 = wg.y * TM;
    let count = min(TM, p.tokens - m0);
    var acc = array<i32, 4>(0, 0, 0, 0);
    for (var i = lid; i < p.words; i += WG) {
        let wv = w[r * p.words + i];
        let base = (i / 8u) * 32u + (i % 8u);
        for (var s = 0u; s < 4u; s++) {
            let codes = (wv >> (6u - 2u * s)) & 0x03030303u;
            for (var t = 0u; t < count; t++) {
                acc[t] += dot4I8Packed(codes, x[(m0 + t) * p.x_words + base + 8u * s]);
            }
        }
    }
    for (var t = 0u; t < TM; t++) {
        partial[lid][t] = acc[t];
    }
    workgroupBarrier();
    for (var half = WG / 2u; half > 0u; half /= 2u) {
        if (lid < half) {
            for (var t = 0u; t < TM; t++) {
                partial[lid][t] += partial[lid + half][t];
            }
        }
        workgroupBarrier();
    }
    if (lid == 0u) {
        for (var t = 0u; t < count; t++) {
            y[(m0 + t) * p.rows + r] = partial[0][t];
        }
    }
}
