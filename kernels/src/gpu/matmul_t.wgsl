// Transposed ternary product: dx[m][k] += sum_n code(n, k) * dy[m][n] over
// the rows n of one weight chunk. One invocation owns one packed word column
// i (16 columns of the output: 4 bytes x 4 bit pairs) for one token, and
// walks the chunk's rows; neighbouring invocations read neighbouring words
// of the same row. Column of (word i, pair s, byte t):
// 128 (i / 8) + 32 s + 4 (i % 8) + t. The host subtracts sum(dy).

struct Params {
    rows: u32,       // rows in this chunk
    words: u32,      // u32 words per packed row
    tokens: u32,     // tokens in this dispatch
    dy_words: u32,   // u32 words per dy row (ceil(total rows / 4))
    row0: u32,       // first row of this chunk in the whole matrix
    accumulate: u32, // 0: write, 1: add to what earlier chunks wrote
    _pad0: u32,
    _pad1: u32,
}

@group(0) @binding(0) var<storage, read> w: array<u32>;
@group(0) @binding(1) var<storage, read> dy: array<u32>;
@group(0) @binding(2) var<storage, read_write> dx: array<i32>;
@group(0) @binding(3) var<uniform> p: Params;

@compute @workgroup_size(64)
fn main(@builtin(global_invocation_id) gid: vec3<u32>) {
    let i = gid.x;
    let m = gid.y;
    if (i >= p.words || m >= p.tokens) {
        return;
    }
    var acc: array<i32, 16>;
    for (var n = 0u; n < p.rows; n++) {
        let wv = w[n * p.words + i];
        let g = p.row0 + n;
        let d = extractBits(i32(dy[m * p.dy_words + g / 4u]), 8u * (g % 4u), 8u);
        for (var s = 0u; s < 4u; s++) {
            for (var t = 0u; t < 4u; t++) {
                let code = i32((wv >> (8u * t + 6u - 2u * s)) & 3u);
                acc[4u * s + t] += code * d;
            }
        }
    }
    let out_row = m * p.words * 16u;
    let col0 = (i / 8u) * 128u + 4u * (i % 8u);
    for (var s = 0u; s < 4u; s++) {
        for (var t = 0u; t < 4u; t++) {
            let k = out_row + col0 + 32u * s + t;
            if (p.accumulate != 0u) {
                dx[k] += acc[4u * s + t];
            } else {
                dx[k] = acc[4u * s + t];
            }
        }
    }
}
