"""Image files beyond 8-bit PNG, as ComfyUI's Save Image (Advanced) writes them, with the graph inside.

- 16-bit PNG: each value ⌊65535·x⌋ clipped (ComfyUI's truncation, like 8-bit's), FFmpeg's encoder (PyAV),
  then the `prompt` and `workflow` text chunks right after the header.
- 32-bit float EXR (OpenEXR): scene-linear by EXR's convention, so sRGB input goes through the inverse
  sRGB curve and HLG ("HDR") input through the inverse HLG curve; "linear" is written as it is. The
  chromaticities (Rec. 709, or Rec. 2020 for HDR) and the graph are header attributes.
- AVIF (PyAV's SVT-AV1): 8-bit or 10-bit 4:2:0, still or animated, tagged sRGB, HLG or PQ; the graph goes
  into an EXIF item as ComfyUI's image savers write it (`prompt:{...}` in tag 0x0110, then each other
  key downwards from 0x010F), which its frontend reads back.

Pixels come as float arrays H × W × C (C = 1, 3 or 4) in ComfyUI's 0..1 range.
"""

from __future__ import annotations

import io
import json
import struct
import zlib
from collections.abc import Mapping, Sequence
from fractions import Fraction
from typing import Any

import numpy as np

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PNG16_FORMATS = {1: "gray16be", 3: "rgb48be", 4: "rgba64be"}
_PNG16_NATIVE = {1: "gray16le", 3: "rgb48le", 4: "rgba64le"}
EXR_COLOR_SPACES = ("sRGB", "HDR", "linear")
AVIF_COLOR_SPACES = ("sRGB", "HDR", "HDR PQ")
AVIF_BIT_DEPTHS = ("auto", "8-bit YUV420", "10-bit YUV420")
# The attributes the EXR format itself defines (OpenEXR's standard and optional ones): a run's text never
# takes one of these names.
EXR_ATTRIBUTES = frozenset(
    {
        *("channels", "compression", "dataWindow", "displayWindow", "lineOrder", "pixelAspectRatio"),
        *("screenWindowCenter", "screenWindowWidth", "tiles", "type", "name", "version", "chunkCount"),
        *("chromaticities", "whiteLuminance", "adoptedNeutral", "comments", "owner", "capDate", "utcOffset"),
        *("longitude", "latitude", "altitude", "focus", "expTime", "aperture", "isoSpeed", "envmap"),
        *("keyCode", "timeCode", "wrapmodes", "framesPerSecond", "multiView", "worldToCamera", "worldToNDC"),
        *("deepImageState", "originalDataWindow", "dwaCompressionLevel", "renderingTransform", "lookModTransform"),
    }
)
# EXIF tags of ASCII text, from Model (the prompt's) down: the other texts take Make, ImageDescription and
# DocumentName in turn, as ComfyUI's savers number them; the next tags down hold numbers, not text.
EXIF_PROMPT_TAG = 0x0110
EXIF_TEXT_TAGS = (0x010F, 0x010E, 0x010D)
# (x, y) of red, green, blue and white (D65)
REC709 = ((0.64, 0.33), (0.30, 0.60), (0.15, 0.06), (0.3127, 0.3290))
REC2020 = ((0.708, 0.292), (0.170, 0.797), (0.131, 0.046), (0.3127, 0.3290))
_HLG_A = 0.17883277
_HLG_B = 1 - 4 * _HLG_A
_HLG_C = 0.5 - _HLG_A * float(np.log(4 * _HLG_A))


class FormatError(ValueError):
    """The images cannot be written in the format asked (a channel count it does not hold, ...)."""


def metadata_texts(prompt: Mapping[str, Any] | None, extra_pnginfo: Mapping[str, Any] | None) -> dict[str, str]:
    """What every format keeps of a run, as SaveImage's PNG chunks: `prompt`, then each extra key."""
    texts = {} if prompt is None else {"prompt": json.dumps(prompt)}
    texts.update({str(key): json.dumps(value) for key, value in (extra_pnginfo or {}).items()})
    return texts


# -- PNG, 16 bits ------------------------------------------------------------------------------------


def png16_bytes(pixels: np.ndarray, texts: Mapping[str, str]) -> bytes:
    import av

    channels = _channels(pixels, (1, 3, 4), "16-bit PNG")
    codes = np.clip(pixels.astype(np.float32) * 65535.0, 0, 65535).astype(np.uint16)  # truncates, as ComfyUI
    codec = av.CodecContext.create("png", "w")
    codec.width, codec.height = pixels.shape[1], pixels.shape[0]
    codec.pix_fmt = _PNG16_FORMATS[channels]
    codec.time_base = Fraction(1, 1)
    frame = av.VideoFrame.from_ndarray(
        codes[..., 0] if channels == 1 else codes, format=_PNG16_NATIVE[channels]
    ).reformat(format=_PNG16_FORMATS[channels])
    frame.pts = 0
    encoded = b"".join(bytes(packet) for packet in [*codec.encode(frame), *codec.encode(None)])
    return with_png_texts(encoded, texts)


def with_png_texts(png: bytes, texts: Mapping[str, str]) -> bytes:
    """`png` with a tEXt chunk per entry right after its header chunk (keys that PNG cannot hold, 1 to 79
    Latin-1 characters, are left out; values are JSON, ASCII already)."""
    if png[:8] != PNG_SIGNATURE or png[12:16] != b"IHDR":
        raise FormatError("the encoder gave no PNG")
    header_end = 8 + 12 + struct.unpack(">I", png[8:12])[0]
    chunks = []
    for key, value in texts.items():
        try:
            name = key.encode("latin-1")
        except UnicodeEncodeError:
            continue
        if not 1 <= len(name) <= 79 or b"\0" in name:
            continue
        body = b"tEXt" + name + b"\0" + value.encode("latin-1", "backslashreplace")
        chunks.append(struct.pack(">I", len(body) - 4) + body + struct.pack(">I", zlib.crc32(body)))
    return png[:header_end] + b"".join(chunks) + png[header_end:]


# -- EXR -----------------------------------------------------------------------------------------------


def srgb_to_linear(values: np.ndarray) -> np.ndarray:
    """The inverse sRGB transfer curve (IEC 61966-2-1), extended to values outside 0..1 by symmetry."""
    magnitude = np.abs(values)
    linear = np.where(magnitude <= 0.04045, magnitude / 12.92, ((magnitude + 0.055) / 1.055) ** 2.4)
    result: np.ndarray = np.sign(values) * linear
    return result


def hlg_to_linear(values: np.ndarray) -> np.ndarray:
    """The inverse HLG OETF of BT.2100: scene-linear light in 0..1 from a signal in 0..1."""
    signal = np.clip(values, 0.0, None)
    low = signal**2 / 3.0
    high = (np.exp((signal - _HLG_C) / _HLG_A) + _HLG_B) / 12.0
    result: np.ndarray = np.where(signal <= 0.5, low, high)
    return result


def exr_bytes(pixels: np.ndarray, color_space: str, texts: Mapping[str, str]) -> bytes:
    import OpenEXR

    channels = _channels(pixels, (1, 3, 4), "EXR")
    if color_space not in EXR_COLOR_SPACES:
        raise FormatError(f"input_color_space {color_space!r} is not one of {', '.join(EXR_COLOR_SPACES)}")
    values = pixels.astype(np.float32)
    colour = values[..., :3] if channels == 4 else values
    if color_space == "sRGB":
        colour = srgb_to_linear(colour)
    elif color_space == "HDR":
        colour = hlg_to_linear(colour)
    colour = colour.astype(np.float32)
    layers: dict[str, np.ndarray] = {}
    if channels == 1:
        layers["Y"] = np.ascontiguousarray(colour[..., 0])
    else:
        for index, name in enumerate("RGB"):
            layers[name] = np.ascontiguousarray(colour[..., index])
        if channels == 4:
            layers["A"] = np.ascontiguousarray(values[..., 3])
    header: dict[str, Any] = {
        "compression": OpenEXR.ZIP_COMPRESSION,
        "type": OpenEXR.scanlineimage,
        "chromaticities": tuple(v for xy in (REC2020 if color_space == "HDR" else REC709) for v in xy),
    }
    # the run's texts as string attributes, but never in place of one EXR itself defines
    header.update({key: value for key, value in texts.items() if key not in EXR_ATTRIBUTES})
    stream = io.BytesIO()
    try:
        OpenEXR.File(header, layers).write(stream)
    except (RuntimeError, ValueError, TypeError) as exc:
        raise FormatError(f"the EXR file could not be written: {exc}") from exc
    return stream.getvalue()


# -- AVIF ----------------------------------------------------------------------------------------------


def avif_bytes(
    frames: Sequence[np.ndarray],
    bit_depth: str,
    color_space: str,
    crf: int,
    texts: Mapping[str, str],
    fps: float | None = None,
    loop_count: int | None = None,
) -> bytes:
    """One AVIF of `frames`: a still image for one, an image sequence (at `fps`, looping `loop_count`
    times, 0 forever) for several."""
    import av
    from av.video.reformatter import ColorPrimaries, ColorRange, Colorspace, ColorTrc

    if bit_depth not in AVIF_BIT_DEPTHS:
        raise FormatError(f"bit_depth {bit_depth!r} is not one of {', '.join(AVIF_BIT_DEPTHS)}")
    if color_space not in AVIF_COLOR_SPACES:
        raise FormatError(f"input_color_space {color_space!r} is not one of {', '.join(AVIF_COLOR_SPACES)}")
    if bit_depth == "auto":
        bit_depth = "8-bit YUV420" if color_space == "sRGB" else "10-bit YUV420"
    ten = bit_depth == "10-bit YUV420"
    primaries, transfer, matrix = {
        "sRGB": (ColorPrimaries.BT709, ColorTrc.IEC61966_2_1, Colorspace.ITU709),
        "HDR": (ColorPrimaries.BT2020, ColorTrc.ARIB_STD_B67, Colorspace.BT2020),
        "HDR PQ": (ColorPrimaries.BT2020, ColorTrc.SMPTE2084, Colorspace.BT2020),
    }[color_space]
    height, width = frames[0].shape[:2]
    pixel_format = "yuv420p10le" if ten else "yuv420p"
    options = {"loop": str(loop_count)} if loop_count is not None and len(frames) > 1 else {}
    stream_out = io.BytesIO()
    with av.open(stream_out, mode="w", format="avif", options=options) as container:
        rate = Fraction(round((fps or 1.0) * 1000), 1000)
        stream = container.add_stream("libsvtav1", rate=rate)
        stream.width, stream.height, stream.pix_fmt = width, height, pixel_format
        stream.options = {"crf": str(crf), "preset": "8"}
        context = stream.codec_context
        context.color_primaries, context.color_trc, context.colorspace = primaries, transfer, matrix
        context.color_range = ColorRange.MPEG
        for index, pixels in enumerate(frames):
            channels = _channels(pixels, (1, 3), "AVIF (the SVT-AV1 encoder has no alpha)")
            if pixels.shape[:2] != (height, width):
                raise FormatError("the images of an animated AVIF must all have one size")
            scale, dtype, source = (65535.0, np.uint16, "rgb48le") if ten else (255.0, np.uint8, "rgb24")
            codes = np.clip(pixels.astype(np.float32) * scale, 0, scale).astype(dtype)
            if channels == 1:
                codes, source = codes[..., 0], ("gray16le" if ten else "gray")
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(codes), format=source)
            frame = frame.reformat(format=pixel_format, dst_colorspace=matrix, dst_color_range=ColorRange.MPEG)
            frame.color_primaries, frame.color_trc, frame.colorspace = primaries, transfer, matrix
            frame.color_range = ColorRange.MPEG
            frame.pts = index
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)
    data = stream_out.getvalue()
    return with_avif_exif(data, exif_payload(texts)) if texts else data


def exif_payload(texts: Mapping[str, str]) -> bytes:
    """The EXIF item ComfyUI's savers write: `prompt:<json>` in tag 0x0110 (Model), the next entries as
    `<key>:<json>` from tag 0x010F (Make) downwards while the tags hold text (three: `workflow` is the usual
    one); with the 4-byte TIFF-header offset HEIF items start with."""
    from PIL import Image

    exif = Image.Exif()
    if "prompt" in texts:
        exif[EXIF_PROMPT_TAG] = f"prompt:{texts['prompt']}"
    others = [(key, value) for key, value in texts.items() if key != "prompt"]
    for tag, (key, value) in zip(EXIF_TEXT_TAGS, others, strict=False):  # any further ones have no text tag
        exif[tag] = f"{key}:{value}"
    try:
        tiff = exif.tobytes()
    except (ValueError, struct.error) as exc:
        raise FormatError(f"the metadata could not be written as EXIF: {exc}") from exc
    return b"\0\0\0\0" + tiff.removeprefix(b"Exif\x00\x00")


# ISO BMFF (HEIF) editing: just enough to add one EXIF item to an AVIF that FFmpeg wrote.


def _boxes(data: bytes, start: int, end: int) -> list[tuple[int, int, bytes, int]]:
    """(offset, size, type, header size) of the boxes between `start` and `end`."""
    found = []
    position = start
    while position + 8 <= end:
        size, kind = struct.unpack_from(">I4s", data, position)
        header = 8
        if size == 1:
            size, header = struct.unpack_from(">Q", data, position + 8)[0], 16
        elif size == 0:
            size = end - position
        if size < header or position + size > end:
            raise FormatError(f"the AVIF has a malformed {kind!r} box")
        found.append((position, size, kind, header))
        position += size
    return found


def _box(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I4s", 8 + len(body), kind) + body


def _uint(data: bytes, offset: int, size: int) -> int:
    return int.from_bytes(data[offset : offset + size], "big") if size else 0


def with_avif_exif(avif: bytes, exif: bytes) -> bytes:
    """`avif` with `exif` as an item describing its primary image (HEIF's `Exif` item, linked by `cdsc`),
    its bytes in a media-data box of their own at the end of the file."""
    top = _boxes(avif, 0, len(avif))
    meta = next((box for box in top if box[2] == b"meta"), None)
    if meta is None:
        raise FormatError("the AVIF has no meta box")
    meta_at, meta_size = meta[0], meta[1]
    children = {kind: (at, size, header) for at, size, kind, header in _boxes(avif, meta_at + 12, meta_at + meta_size)}
    if not {b"pitm", b"iloc", b"iinf"} <= children.keys():
        raise FormatError("the AVIF's meta box lacks its item boxes")
    pitm_at = children[b"pitm"][0]
    primary = _uint(avif, pitm_at + 12, 2 if avif[pitm_at + 8] == 0 else 4)

    def rebuilt(delta: int, exif_at: int) -> bytes:
        iloc, ids = _iloc_with(avif, children[b"iloc"], delta, meta_at + meta_size, exif_at, len(exif))
        item = max(ids) + 1
        iinf = _iinf_with(avif, children[b"iinf"], item)
        reference = _box(b"cdsc", struct.pack(">HHH", item, 1, primary))
        if b"iref" in children:
            at, size, _ = children[b"iref"]
            if avif[at + 8] != 0:
                raise FormatError("the AVIF's item references use 32-bit ids")
            iref = _box(b"iref", avif[at + 8 : at + size] + reference)
        else:
            iref = _box(b"iref", b"\0\0\0\0" + reference)
        body = bytearray(avif[meta_at + 8 : meta_at + 12])
        for at, size, kind, _ in _boxes(avif, meta_at + 12, meta_at + meta_size):
            if kind == b"iloc":
                body += iloc
            elif kind == b"iinf":
                body += iinf + (b"" if b"iref" in children else iref)
            elif kind == b"iref":
                body += iref
            else:
                body += avif[at : at + size]
        return _box(b"meta", bytes(body))

    grown = len(rebuilt(0, 0)) - meta_size  # every offset past the meta box moves by this much
    exif_at = len(avif) + grown + 8
    parts = []
    for at, size, kind, _ in top:
        if kind == b"ftyp" and avif[at + 8 : at + 12] == b"avis" and b"avif" in avif[at + 16 : at + size]:
            # an image sequence whose still image readers (ComfyUI's frontend among them) look for its
            # metadata under the still-image brand; "avis" stays among the compatible brands
            parts.append(avif[at : at + 8] + b"avif" + avif[at + 12 : at + size])
        elif kind == b"meta":
            parts.append(rebuilt(grown, exif_at))
        elif kind == b"moov":
            parts.append(_shift_chunk_offsets(avif[at : at + size], grown, meta_at + meta_size))
        else:
            parts.append(avif[at : at + size])
    return b"".join(parts) + _box(b"mdat", exif)


def _iloc_with(
    data: bytes, box: tuple[int, int, int], delta: int, moved_from: int, exif_at: int, exif_size: int
) -> tuple[bytes, list[int]]:
    """The item-location box with the file offsets past `moved_from` moved by `delta`, and one more item
    (the EXIF one, at `exif_at`); also the ids it lists."""
    at, _, _ = box
    version = data[at + 8]
    offset_size, length_size = data[at + 12] >> 4, data[at + 12] & 15
    base_size, index_size = data[at + 13] >> 4, (data[at + 13] & 15) if version else 0
    if offset_size == 0 or length_size == 0:
        raise FormatError("the AVIF's item locations leave offsets or lengths out")
    id_size = 2 if version < 2 else 4
    cursor = at + 14
    count = _uint(data, cursor, id_size)
    cursor += id_size
    out = bytearray()
    ids = []
    for _ in range(count):
        ids.append(_uint(data, cursor, id_size))
        out += data[cursor : cursor + id_size]
        cursor += id_size
        method = 0
        if version:
            method = data[cursor + 1] & 15
            out += data[cursor : cursor + 2]
            cursor += 2
        out += data[cursor : cursor + 2]  # data reference index
        cursor += 2
        base = _uint(data, cursor, base_size)
        cursor += base_size
        extents = _uint(data, cursor, 2)
        cursor += 2
        # construction method 0 gives file offsets: they move when they point past the meta box
        shift_base = method == 0 and base_size > 0 and base >= moved_from
        out += (base + delta if shift_base else base).to_bytes(base_size, "big") + extents.to_bytes(2, "big")
        for _ in range(extents):
            out += data[cursor : cursor + index_size]
            cursor += index_size
            offset = _uint(data, cursor, offset_size)
            cursor += offset_size
            if method == 0 and not shift_base and base + offset >= moved_from:
                offset += delta
            out += offset.to_bytes(offset_size, "big") + data[cursor : cursor + length_size]
            cursor += length_size
    item = max(ids, default=0) + 1
    out += item.to_bytes(id_size, "big")
    if version:
        out += b"\0\0"  # construction method 0: a file offset
    out += b"\0\0" + (0).to_bytes(base_size, "big") + (1).to_bytes(2, "big")
    out += b"\0" * index_size + exif_at.to_bytes(offset_size, "big") + exif_size.to_bytes(length_size, "big")
    head = data[at + 8 : at + 14] + (count + 1).to_bytes(id_size, "big")
    return _box(b"iloc", bytes(head + out)), ids


def _iinf_with(data: bytes, box: tuple[int, int, int], item: int) -> bytes:
    at, size, _ = box
    version = data[at + 8]
    count_size = 2 if version == 0 else 4
    count = _uint(data, at + 12, count_size)
    entries = data[at + 12 + count_size : at + size]
    entry = _box(b"infe", b"\x02\0\0\0" + struct.pack(">HH4s", item, 0, b"Exif") + b"\0")
    return _box(b"iinf", data[at + 8 : at + 12] + (count + 1).to_bytes(count_size, "big") + entries + entry)


def _shift_chunk_offsets(moov: bytes, delta: int, moved_from: int) -> bytes:
    """A sequence's movie box with its chunk offsets (stco, co64) past `moved_from` moved by `delta`."""
    out = bytearray(moov)
    containers = {b"moov", b"trak", b"mdia", b"minf", b"stbl"}

    def walk(start: int, end: int) -> None:
        for at, size, kind, header in _boxes(bytes(out), start, end):
            if kind in containers:
                walk(at + header, at + size)
            elif kind in (b"stco", b"co64"):
                width = 4 if kind == b"stco" else 8
                count = struct.unpack_from(">I", out, at + header + 4)[0]
                for index in range(count):
                    position = at + header + 8 + index * width
                    value = int.from_bytes(out[position : position + width], "big")
                    if value >= moved_from:
                        out[position : position + width] = (value + delta).to_bytes(width, "big")

    walk(0, len(out))
    return bytes(out)


def _channels(pixels: np.ndarray, allowed: tuple[int, ...], what: str) -> int:
    channels = pixels.shape[2] if pixels.ndim == 3 else 1
    if pixels.ndim not in (2, 3) or channels not in allowed:
        listed = ", ".join(str(n) for n in allowed)
        raise FormatError(f"{what} holds images of {listed} channels, not {channels}")
    return channels
