//! EXIF orientation: read the tag and apply it the way Pillow's `ImageOps.exif_transpose` does.
//! Only used with the opt-in `--exif-transpose` (the reference ignores orientation).

use crate::rgb::RgbImage;

/// The EXIF orientation tag (1–8) of a JPEG, PNG or WebP file, if present and valid.
pub fn orientation(bytes: &[u8]) -> Option<u16> {
    let exif = exif::Reader::new()
        .read_from_container(&mut std::io::Cursor::new(bytes))
        .ok()?;
    let field = exif.get_field(exif::Tag::Orientation, exif::In::PRIMARY)?;
    let v = field.value.get_uint(0)? as u16;
    (1..=8).contains(&v).then_some(v)
}

/// Applies orientation `o` (EXIF values 1–8) so the image is shown upright.
pub fn apply_orientation(img: RgbImage, o: u16) -> RgbImage {
    let (w, h) = (img.width, img.height);
    // Map each output pixel (x, y) to its source pixel.
    type SourceOf = Box<dyn Fn(u32, u32) -> (u32, u32)>;
    let (ow, oh, src): (u32, u32, SourceOf) = match o {
        2 => (w, h, Box::new(move |x, y| (w - 1 - x, y))),
        3 => (w, h, Box::new(move |x, y| (w - 1 - x, h - 1 - y))),
        4 => (w, h, Box::new(move |x, y| (x, h - 1 - y))),
        5 => (h, w, Box::new(move |x, y| (y, x))),
        6 => (h, w, Box::new(move |x, y| (y, h - 1 - x))),
        7 => (h, w, Box::new(move |x, y| (w - 1 - y, h - 1 - x))),
        8 => (h, w, Box::new(move |x, y| (w - 1 - y, x))),
        _ => return img,
    };
    let mut data = Vec::with_capacity(img.data.len());
    for y in 0..oh {
        for x in 0..ow {
            let (sx, sy) = src(x, y);
            data.extend_from_slice(&img.pixel(sx, sy));
        }
    }
    RgbImage {
        width: ow,
        height: oh,
        data,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn img() -> RgbImage {
        // 2 wide, 3 tall; pixel value = index.
        RgbImage::from_raw(2, 3, (0..6).flat_map(|i| [i, i, i]).collect()).unwrap()
    }

    fn firsts(i: &RgbImage) -> Vec<u8> {
        i.data.chunks(3).map(|p| p[0]).collect()
    }

    #[test]
    fn orientations_match_pillow_transposes() {
        // Source rows: [0 1] [2 3] [4 5].
        assert_eq!(firsts(&apply_orientation(img(), 2)), vec![1, 0, 3, 2, 5, 4]);
        assert_eq!(firsts(&apply_orientation(img(), 3)), vec![5, 4, 3, 2, 1, 0]);
        assert_eq!(firsts(&apply_orientation(img(), 4)), vec![4, 5, 2, 3, 0, 1]);
        assert_eq!(firsts(&apply_orientation(img(), 5)), vec![0, 2, 4, 1, 3, 5]);
        // 6 = rotate 90° clockwise to display (Pillow ROTATE_270).
        assert_eq!(firsts(&apply_orientation(img(), 6)), vec![4, 2, 0, 5, 3, 1]);
        assert_eq!(firsts(&apply_orientation(img(), 7)), vec![5, 3, 1, 4, 2, 0]);
        assert_eq!(firsts(&apply_orientation(img(), 8)), vec![1, 3, 5, 0, 2, 4]);
        assert_eq!(apply_orientation(img(), 6).width, 3);
    }
}
