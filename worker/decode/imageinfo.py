"""What ``worker.decode.headers.sniff`` learns about an encoded image, and the errors its header parsers raise."""

from __future__ import annotations

from dataclasses import dataclass, field

from worker.errors import UndecodableImage

FORMATS = ("jpeg", "png", "webp", "bmp", "tiff")
COLORS = ("gray", "gray_alpha", "rgb", "rgba", "palette", "cmyk", "ycck", "other")


@dataclass(frozen=True, slots=True)
class ImageInfo:
    format: str  # one of FORMATS
    width: int
    height: int
    channels: int  # samples per stored pixel as the header declares (palette: 1, one index)
    bit_depth: int  # bits per sample of the decoded image: palette and 1/2/4-bit data unpack to 8
    color: str  # one of COLORS
    bits_per_pixel: int  # as stored: 1 for bilevel, 4 for a 16-colour palette, 24 for 8-bit RGB, ...
    # Where the header walk stopped, for check_coded_data (JPEG: the first SOS marker and the frame type).
    data_at: int = field(default=0, compare=False)
    jpeg_sof: int = field(default=0, compare=False)

    @property
    def pixels(self) -> int:
        return self.width * self.height


def truncated_header(fmt: str, n: int, need: int | str) -> UndecodableImage:
    return UndecodableImage(f"{fmt} header truncated at byte {n} (needs {need}): the value was cut short; "
                            "resend the whole file")


def corrupt_header(fmt: str, what: str) -> UndecodableImage:
    return UndecodableImage(f"{fmt} header is corrupt: {what}")
