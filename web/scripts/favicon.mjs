// The 32×32 /favicon.ico, drawn here so the build makes it from code (no binary in src/): the
// shape of src/favicon.svg, a speech bubble with three dots, antialiased by 4×4 supersampling.
// Deterministic: the same bytes on every build.

const SIZE = 32;
const ACCENT = [0x2f, 0x5b, 0xd3];

/** Coverage of the bubble (1) and of its dots (2) at a point, 0 outside. */
function shapeAt(x, y) {
  for (const cx of [10, 16, 22]) if ((x - cx) ** 2 + (y - 14) ** 2 <= 4) return 2;
  // Rounded rectangle 3..29 × 4..24, radius 6.
  const rx = Math.min(Math.max(x, 9), 23);
  const ry = Math.min(Math.max(y, 10), 18);
  if (x >= 3 && x <= 29 && y >= 4 && y <= 24 && (x - rx) ** 2 + (y - ry) ** 2 <= 36) return 1;
  // The tail: the triangle (8,24) (15,24) (8,29).
  if (x >= 8 && y >= 24 && y <= 29 && (x - 8) / 7 + (y - 24) / 5 <= 1) return 1;
  return 0;
}

/** The icon as an ICO file holding one 32-bit BMP image. */
export function faviconIco() {
  const pixels = Buffer.alloc(SIZE * SIZE * 4);
  for (let row = 0; row < SIZE; row++) {
    for (let col = 0; col < SIZE; col++) {
      let bubble = 0;
      let dot = 0;
      for (let sy = 0; sy < 4; sy++) {
        for (let sx = 0; sx < 4; sx++) {
          const s = shapeAt(col + (sx + 0.5) / 4, row + (sy + 0.5) / 4);
          if (s === 1) bubble++;
          else if (s === 2) dot++;
        }
      }
      const cover = (bubble + dot) / 16;
      const white = bubble + dot === 0 ? 0 : dot / (bubble + dot);
      const rgb = ACCENT.map((c) => Math.round(c + (255 - c) * white));
      // BMP rows go bottom-up, pixels as BGRA.
      const at = ((SIZE - 1 - row) * SIZE + col) * 4;
      pixels[at] = rgb[2];
      pixels[at + 1] = rgb[1];
      pixels[at + 2] = rgb[0];
      pixels[at + 3] = Math.round(cover * 255);
    }
  }
  const mask = Buffer.alloc(SIZE * 4); // AND mask, 1 bit per pixel, rows padded to 4 bytes; alpha decides
  const header = Buffer.alloc(40);
  header.writeUInt32LE(40, 0); // biSize
  header.writeInt32LE(SIZE, 4); // width
  header.writeInt32LE(SIZE * 2, 8); // height: image and mask
  header.writeUInt16LE(1, 12); // planes
  header.writeUInt16LE(32, 14); // bits per pixel
  header.writeUInt32LE(pixels.length + mask.length, 20); // image size
  const image = Buffer.concat([header, pixels, mask]);
  const dir = Buffer.alloc(6 + 16);
  dir.writeUInt16LE(0, 0);
  dir.writeUInt16LE(1, 2); // type: icon
  dir.writeUInt16LE(1, 4); // one image
  dir.writeUInt8(SIZE, 6);
  dir.writeUInt8(SIZE, 7);
  dir.writeUInt16LE(1, 10); // planes
  dir.writeUInt16LE(32, 12); // bits per pixel
  dir.writeUInt32LE(image.length, 14);
  dir.writeUInt32LE(dir.length, 18); // offset of the image
  return new Uint8Array(Buffer.concat([dir, image]));
}
