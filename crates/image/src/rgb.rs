//! A plain 8-bit RGB raster: the unit every other module of this crate works on.

/// An 8-bit RGB image stored row-major, 3 bytes per pixel (HWC), no padding between rows.
#[derive(Clone, PartialEq, Eq)]
pub struct RgbImage {
    pub width: u32,
    pub height: u32,
    pub data: Vec<u8>,
}

impl std::fmt::Debug for RgbImage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "RgbImage({}x{})", self.width, self.height)
    }
}

impl RgbImage {
    /// Wraps `data`; its length must be `width * height * 3`.
    pub fn from_raw(width: u32, height: u32, data: Vec<u8>) -> Option<Self> {
        (data.len() == width as usize * height as usize * 3).then_some(Self {
            width,
            height,
            data,
        })
    }

    /// Bytes of one row.
    pub fn row(&self, y: u32) -> &[u8] {
        let stride = self.width as usize * 3;
        &self.data[y as usize * stride..(y as usize + 1) * stride]
    }

    /// The pixel at column `x`, row `y`.
    pub fn pixel(&self, x: u32, y: u32) -> [u8; 3] {
        let i = (y as usize * self.width as usize + x as usize) * 3;
        [self.data[i], self.data[i + 1], self.data[i + 2]]
    }

    /// Copies the rectangle with top-left corner (`x`, `y`) and size `w` × `h`, like Pillow's
    /// `crop` for a box that lies inside the image.
    ///
    /// # Panics
    /// If the rectangle is not inside the image (callers compute boxes from the image's own size).
    pub fn crop(&self, x: u32, y: u32, w: u32, h: u32) -> RgbImage {
        assert!(
            x + w <= self.width && y + h <= self.height,
            "crop box outside image"
        );
        let mut data = Vec::with_capacity(w as usize * h as usize * 3);
        for row in y..y + h {
            let r = self.row(row);
            data.extend_from_slice(&r[x as usize * 3..(x + w) as usize * 3]);
        }
        RgbImage {
            width: w,
            height: h,
            data,
        }
    }
}
