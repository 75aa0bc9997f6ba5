"""Video containers: which one a file is (from its first bytes), how it is opened, and what each output can hold.

Reading: :func:`sniff_container` recognises a container from the head of a file without FFmpeg. The container it finds
selects the demuxer, which is then *forced* when the file is opened: FFmpeg's own format guessing can pick demuxers
that open other files or URLs named inside the input (HLS, concat and DASH playlists), so a file that is not one of
these containers never reaches FFmpeg at all. Image files in an ISO box structure (HEIC, AVIF) and audio-only
brands (M4A) are not videos.

Writing: :data:`OUTPUTS` says which codecs each output container holds (FFmpeg's own answer is not reliable for
every muxer), and :func:`choose_output` picks the output container of a video: the input's own where it can hold the
chosen codec and store exact timestamps, else Matroska, with a note saying so.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

HEAD_BYTES = 512
"""Bytes :func:`sniff_container` needs from the start of a file (three MPEG-TS packets, an M2TS one more)."""


@dataclass(frozen=True)
class Container:
    """A video container this library recognises.

    ``name`` is short and doubles as the usual extension ("mp4", "mkv", "ts", ...); ``description`` names it in
    messages ("an MP4 video"); ``demuxer`` is the FFmpeg demuxer forced when opening it (None: recognised, not read);
    ``seek_by_bytes`` says its timestamp seeks are not exact (MPEG-TS lands after the keyframe, FLV fails on the last
    one), so a segment is found by the byte position of its keyframe packet instead.
    """

    name: str
    description: str
    demuxer: str | None
    seek_by_bytes: bool = False


CONTAINERS: dict[str, Container] = {
    c.name: c
    for c in (
        Container("mp4", "an MP4 video", "mov"),
        Container("mov", "a QuickTime video", "mov"),
        Container("3gp", "a 3GP video", "mov"),
        Container("mkv", "a Matroska video", "matroska"),
        Container("webm", "a WebM video", "matroska"),
        Container("avi", "an AVI video", "avi"),
        Container("ts", "an MPEG transport stream", "mpegts", seek_by_bytes=True),
        Container("m2ts", "an MPEG-2 transport stream (M2TS)", "mpegts", seek_by_bytes=True),
        Container("mpg", "an MPEG program stream", "mpeg", seek_by_bytes=True),
        Container("m2v", "an MPEG video elementary stream", None),
        Container("flv", "an FLV video", "flv", seek_by_bytes=True),
        Container("ogg", "an Ogg video", "ogg", seek_by_bytes=True),
        Container("wmv", "a Windows Media video", "asf"),
    )
}

# File names taken for videos when a folder is searched (case-insensitive), and the container each suggests; what a
# file is comes from its content (:func:`sniff_container`), the name only finds it and names its output.
VIDEO_SUFFIXES: dict[str, str] = {
    ".mp4": "mp4",
    ".m4v": "mp4",
    ".mov": "mov",
    ".3gp": "3gp",
    ".mkv": "mkv",
    ".webm": "webm",
    ".avi": "avi",
    ".ts": "ts",
    ".m2ts": "m2ts",
    ".mts": "m2ts",
    ".mpg": "mpg",
    ".mpeg": "mpg",
    ".flv": "flv",
    ".ogv": "ogg",
    ".wmv": "wmv",
}

# ISO base media brands of still images and image sequences (HEIF, AVIF, Canon raw): an 'ftyp' box alone does not
# make a video. Audio-only brands (iTunes audio and audio books) are not videos either.
IMAGE_BRANDS = frozenset(
    {b"heic", b"heix", b"heim", b"heis", b"hevc", b"hevx", b"mif1", b"msf1", b"avif", b"avis", b"avci", b"jpeg"}
    | {b"crx "}
)
AUDIO_BRANDS = frozenset({b"M4A ", b"M4B ", b"M4P "})
# First atoms of QuickTime files written before the 'ftyp' box existed.
QUICKTIME_ATOMS = frozenset({b"moov", b"mdat", b"wide", b"free", b"skip", b"pnot"})
_ASF_GUID = bytes.fromhex("3026b2758e66cf11a6d900aa0062ce6c")
# Identification headers of video codecs in Ogg (Theora, VP8, Daala, Dirac); Ogg without one is audio.
_OGG_VIDEO = (b"\x80theora", b"OVP80", b"\x80daala", b"BBCD\x00")
_EBML_MAGIC, _EBML_DOCTYPE = 0x1A45DFA3, 0x4282


def sniff_container(head: bytes) -> Container | None:
    """The video container a file's first bytes announce (give at least :data:`HEAD_BYTES`), or None.

    None for anything else, images and audio-only files included. The probe decides the rest: a recognised
    container may still hold no video stream (an audio-only MP4 or Matroska file).
    """
    head = bytes(head[:HEAD_BYTES])
    if head[4:8] == b"ftyp" and len(head) >= 12:
        return _iso_brand(head)
    if head[4:8] in QUICKTIME_ATOMS and _atom_size_ok(head):
        return CONTAINERS["mov"]
    if head[:4] == b"\x1a\x45\xdf\xa3":
        doctype = _ebml_doctype(head)
        return CONTAINERS["webm"] if doctype == "webm" else CONTAINERS["mkv"] if doctype == "matroska" else None
    if head[:4] == b"RIFF" and head[8:12] == b"AVI ":
        return CONTAINERS["avi"]
    if head[:4] == b"FLV\x01":
        return CONTAINERS["flv"]
    if head[:4] == b"\x00\x00\x01\xba":
        return CONTAINERS["mpg"]
    if head[:4] == b"\x00\x00\x01\xb3":
        return CONTAINERS["m2v"]
    if head[:16] == _ASF_GUID:
        return CONTAINERS["wmv"]
    if head[:4] == b"OggS":
        return CONTAINERS["ogg"] if any(tag in head for tag in _OGG_VIDEO) else None
    if _sync_bytes(head, 0, 188):
        return CONTAINERS["ts"]
    if _sync_bytes(head, 4, 192):  # M2TS: a 4-byte timestamp before each 188-byte packet
        return CONTAINERS["m2ts"]
    return None


def _iso_brand(head: bytes) -> Container | None:
    major = head[8:12]
    if major in IMAGE_BRANDS or major in AUDIO_BRANDS:
        return None
    if major == b"qt  ":
        return CONTAINERS["mov"]
    if major[:3] in (b"3gp", b"3g2"):
        return CONTAINERS["3gp"]
    return CONTAINERS["mp4"]


def _atom_size_ok(head: bytes) -> bool:
    """A plausible first atom size: at least its own 8-byte header, 1 (a 64-bit size follows) or 0 (to the end)."""
    size = struct.unpack(">I", head[:4])[0]
    return size >= 8 or size in (0, 1)


def _sync_bytes(head: bytes, offset: int, packet: int) -> bool:
    """The MPEG-TS sync byte 0x47 at the start of every packet in ``head`` (at least three packets)."""
    count = (len(head) - offset + packet - 1) // packet
    return count >= 3 and all(head[offset + k * packet] == 0x47 for k in range(count))


def _vint(data: bytes, i: int, *, marker: bool) -> tuple[int, int] | None:
    """An EBML variable-length integer at ``data[i]``: (value, index after it), or None if cut off or invalid.
    Element IDs keep their length marker bit (``marker=True``), sizes do not."""
    if i >= len(data) or data[i] == 0:
        return None
    length = 9 - data[i].bit_length()
    if i + length > len(data):
        return None
    value = data[i] if marker else data[i] & (0xFF >> length)
    for byte in data[i + 1 : i + length]:
        value = value << 8 | byte
    return value, i + length


def _ebml_doctype(head: bytes) -> str | None:
    """The DocType of an EBML header ("matroska", "webm", ...), or None when it is not in ``head``."""
    element = _vint(head, 0, marker=True)
    size = element and element[0] == _EBML_MAGIC and _vint(head, element[1], marker=False)
    if not size:
        return None
    i, end = size[1], min(len(head), size[1] + size[0])
    while i < end:
        child = _vint(head, i, marker=True)
        length = child and _vint(head, child[1], marker=False)
        if not length:
            return None
        i = length[1]
        if child[0] == _EBML_DOCTYPE:
            return head[i : i + length[0]].rstrip(b"\x00").decode("ascii", "replace")
        i += length[0]
    return None


# ----------------------------------------------------------------------------------------------------------------------
# Output containers


@dataclass(frozen=True)
class OutputFormat:
    """An output container: its FFmpeg muxer, extension, HTTP content type and the codecs it holds.

    ``video`` lists this library's codec names (see :data:`~edsr_ray.video.options.CODECS`); ``audio`` and
    ``subtitles`` FFmpeg codec names that are copied as they are. Other audio is re-encoded with ``audio_encoder``;
    other text subtitles are converted to ``text_subtitles`` (None: the container holds none, they are dropped).
    """

    name: str
    muxer: str
    extension: str
    description: str
    content_type: str
    video: frozenset[str]
    audio: frozenset[str]
    subtitles: frozenset[str]
    audio_encoder: str
    text_subtitles: str | None

    def refuses(self, codec: str) -> str | None:
        """Why this container cannot hold ``codec`` video, or None when it can."""
        if codec in self.video:
            return None
        return f"{self.description} cannot hold {codec} video; it holds {', '.join(sorted(self.video))}"


_PCM = frozenset({"pcm_s16le", "pcm_s24le", "pcm_s32le", "pcm_f32le"})
OUTPUTS: dict[str, OutputFormat] = {
    o.name: o
    for o in (
        OutputFormat(
            "mp4",
            "mp4",
            ".mp4",
            "MP4",
            "video/mp4",
            frozenset({"h264", "h265", "vp9", "av1", "ffv1"}),
            frozenset({"aac", "mp3", "opus", "flac", "ac3", "eac3", "alac"}),
            frozenset({"mov_text"}),
            "aac",
            "mov_text",
        ),
        OutputFormat(
            "mov",
            "mov",
            ".mov",
            "QuickTime",
            "video/quicktime",
            frozenset({"h264", "h265"}),
            frozenset({"aac", "mp3", "ac3", "eac3", "alac", "pcm_s16be", "pcm_s24be"}) | _PCM,
            frozenset({"mov_text"}),
            "aac",
            "mov_text",
        ),
        OutputFormat(
            "mkv",
            "matroska",
            ".mkv",
            "Matroska",
            "video/x-matroska",
            frozenset({"h264", "h265", "vp9", "av1", "ffv1"}),
            frozenset({"aac", "mp3", "mp2", "opus", "vorbis", "flac", "ac3", "eac3", "dts", "truehd", "alac"}) | _PCM,
            frozenset({"subrip", "ass", "ssa", "webvtt", "hdmv_pgs_subtitle", "dvd_subtitle", "dvb_subtitle"}),
            "flac",
            "subrip",
        ),
        OutputFormat(
            "webm",
            "webm",
            ".webm",
            "WebM",
            "video/webm",
            frozenset({"vp9", "av1"}),
            frozenset({"opus", "vorbis"}),
            frozenset({"webvtt"}),
            "libopus",
            "webvtt",
        ),
        OutputFormat(
            "ts",
            "mpegts",
            ".ts",
            "MPEG-TS",
            "video/mp2t",
            frozenset({"h264", "h265"}),
            frozenset({"aac", "mp3", "mp2", "ac3", "eac3"}),
            frozenset({"dvb_subtitle"}),
            "aac",
            None,
        ),
    )
}

# The output container a "same" output uses for each input container; inputs not listed are written as Matroska.
_SAME = {"mp4": "mp4", "3gp": "mp4", "mov": "mov", "mkv": "mkv", "webm": "webm", "ts": "ts"}
REQUESTABLE = ("same", "mp4", "mkv", "webm", "mov")
"""What a user may ask for as the output container: the input's own ("same") or one of these."""


@dataclass(frozen=True)
class OutputChoice:
    """The output container of one video; ``same_family`` says the input's key can be kept as it is (an .m4v stays
    .m4v, a .3gp stays .3gp: both are written as MP4); else the key gets ``format.extension``. ``note`` says why the
    container differs from the input's, for the manifest."""

    format: OutputFormat
    same_family: bool
    note: str | None = None


def choose_output(container: str, codec: str, requested: str = "same") -> OutputChoice:
    """The output container for an input ``container`` (a :data:`CONTAINERS` name) written with ``codec``.

    ``requested`` "same" keeps the input's container where it holds ``codec``; otherwise the video is written as
    Matroska, which holds every codec here, and the note says so. AVI inputs are always written as Matroska: AVI
    stores no presentation times (a stream with B-frames, or starting later than 0, would come back shifted). An
    explicitly requested container must hold the codec (checked by :class:`~edsr_ray.video.options.VideoOptions`).
    """
    if requested != "same":
        fmt = OUTPUTS[requested]
        if fmt.refuses(codec):
            raise ValueError(fmt.refuses(codec))
        return OutputChoice(fmt, _SAME.get(container) == fmt.name)
    own = _SAME.get(container)
    if own is not None and codec in OUTPUTS[own].video:
        return OutputChoice(OUTPUTS[own], True)
    source = CONTAINERS[container].description if container in CONTAINERS else container
    if container == "avi":
        why = "AVI stores no timestamps, so frames would lose their times"
    elif own is None:
        why = "this library writes no such container"
    else:
        why = OUTPUTS[own].refuses(codec)
    return OutputChoice(OUTPUTS["mkv"], False, f"{source} written as Matroska (.mkv): {why}")
