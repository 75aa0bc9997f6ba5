"""The input's other streams (audio, subtitles, attachments) in the output: copied bit-exact where the output container
holds their codec, otherwise re-encoded (audio) or converted (text subtitles), otherwise dropped, and each of these
said in a note for the manifest.

Audio that must be re-encoded goes to the container's usual codec (:attr:`OutputFormat.audio_encoder`: AAC for MP4
and MOV, Opus for WebM, FLAC, which is lossless, for Matroska). Text subtitles are converted by rewriting their
payloads (MP4's mov_text is a 16-bit length and UTF-8 text, SubRip and WebVTT packets are the text, ASS events carry
it in their last field), which keeps every cue's timing; styling is dropped. Bitmap subtitles cannot be converted.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass, field

import av
import av.audio.fifo

from edsr_ray.video.containers import OutputFormat
from edsr_ray.video.probe import codec_name

TEXT_SUBTITLES = frozenset({"mov_text", "subrip", "srt", "webvtt", "ass", "ssa", "text"})
AUDIO_BIT_RATE = 256_000  # of re-encoded lossy audio: well above transparency for stereo AAC and Opus
_ASS_OVERRIDE = re.compile(r"\{[^}]*\}")
# An empty mov_text sample: MP4 files fill the gaps between cues with these and the muxer writes its own again.
_MOV_TEXT_GAP = b"\x00\x00"


def text_of(codec: str, payload: bytes) -> str:
    """The plain text of one subtitle packet of a text ``codec``."""
    if codec == "mov_text":
        length = int.from_bytes(payload[:2], "big")
        return payload[2 : 2 + length].decode("utf-8", "replace")
    text = payload.decode("utf-8", "replace")
    if codec in ("ass", "ssa"):  # ReadOrder,Layer,Style,Name,MarginL,MarginR,MarginV,Effect,Text
        text = _ASS_OVERRIDE.sub("", text.split(",", 8)[-1]).replace("\\N", "\n").replace("\\n", "\n")
    return text


def payload_of(codec: str, text: str) -> bytes:
    """One subtitle packet of a text ``codec`` (mov_text, subrip or webvtt) holding ``text``."""
    data = text.encode("utf-8")
    if codec == "mov_text":
        return len(data).to_bytes(2, "big") + data
    return data


class _Handler:
    """Turns the packets of one input stream into packets of its output stream (:meth:`packets`, then
    :meth:`flush` once at the end)."""

    def __init__(self, source: av.stream.Stream, target: av.stream.Stream):
        self.source, self.target = source, target
        self.codec = codec_name(source)

    def _bound(self, packet: av.Packet) -> av.Packet:
        """``packet`` addressed to the output stream, its timestamps still in the input stream's time base."""
        packet.time_base = self.source.time_base
        packet.stream = self.target
        return packet

    def packets(self, packet: av.Packet) -> Iterator[av.Packet]:
        raise NotImplementedError

    def flush(self) -> Iterator[av.Packet]:
        return iter(())


class _Copy(_Handler):
    """Packets passed through unchanged (only re-bound to the output stream)."""

    def packets(self, packet: av.Packet) -> Iterator[av.Packet]:
        if packet.size and not (self.codec == "mov_text" and bytes(packet) == _MOV_TEXT_GAP):
            yield self._bound(packet)


class _Text(_Handler):
    """Text subtitle packets rewritten into another text codec (``target_codec``), their timing unchanged."""

    def __init__(self, source: av.stream.Stream, target: av.stream.Stream, target_codec: str):
        super().__init__(source, target)
        self.target_codec = target_codec

    def packets(self, packet: av.Packet) -> Iterator[av.Packet]:
        text = text_of(self.codec, bytes(packet)) if packet.size else ""
        if text.strip():  # gap samples and empty events are left out
            out = av.Packet(payload_of(self.target_codec, text))
            out.pts, out.dts, out.duration = packet.pts, packet.dts, packet.duration
            yield self._bound(out)


class _Audio(_Handler):
    """Audio decoded and encoded again, resampled to what the encoder takes, in frames of its frame size."""

    def __init__(self, source: av.AudioStream, target: av.AudioStream):
        super().__init__(source, target)
        ctx = target.codec_context
        self.resampler = av.AudioResampler(format=ctx.format.name, layout=ctx.layout.name, rate=ctx.sample_rate)
        self.fifo = av.audio.fifo.AudioFifo()
        self.frame_size = ctx.frame_size or 1024

    def packets(self, packet: av.Packet) -> Iterator[av.Packet]:
        if not packet.size:  # the demuxer's end-of-stream packet: flush() drains the decoder
            return
        for frame in self.source.decode(packet):
            yield from self._encode(self.resampler.resample(frame), final=False)

    def flush(self) -> Iterator[av.Packet]:
        for frame in self.source.decode(None):
            yield from self._encode(self.resampler.resample(frame), final=False)
        yield from self._encode(self.resampler.resample(None), final=True)
        yield from self.target.encode(None)

    def _encode(self, frames: list[av.AudioFrame], *, final: bool) -> Iterator[av.Packet]:
        for frame in frames:
            self.fifo.write(frame)
        while self.fifo.samples >= self.frame_size or (final and self.fifo.samples):
            chunk = self.fifo.read(min(self.frame_size, self.fifo.samples))
            yield from self.target.encode(chunk)


@dataclass
class StreamPlan:
    """What happens to each of the input's other streams: ``handlers`` by input stream index (each turns an input
    packet into output packets), ``descriptions`` of the output's streams and ``notes`` on everything not copied."""

    handlers: dict[int, _Handler] = field(default_factory=dict)
    descriptions: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def plan_streams(
    inp: av.container.InputContainer, out: av.container.OutputContainer, output: OutputFormat, video_index: int
) -> StreamPlan:
    """Add an output stream for each stream of ``inp`` other than the video at ``video_index`` that ``output`` can
    hold (as is or converted); every stream that is left out or converted gets a note."""
    plan = StreamPlan()
    for s in inp.streams:
        if s.index == video_index:
            continue
        codec = codec_name(s)
        what = f"{s.type} #{s.index} {codec or 'data'}"
        if s.type == "audio":
            _add_audio(plan, out, output, s, codec, what)
        elif s.type == "subtitle":
            _add_subtitle(plan, out, output, s, codec, what)
        elif s.type == "attachment" and output.name == "mkv":
            out.add_stream_from_template(s)
            plan.descriptions.append(f"{what} copied")
        elif s.type == "video" and s.disposition & av.stream.Disposition.attached_pic:
            plan.notes.append(f"{what} dropped: a cover picture")
        elif s.type == "video":
            plan.notes.append(f"{what} dropped: only the first video stream is upscaled")
        else:
            plan.notes.append(f"{what} dropped: {output.description} output carries no {s.type} streams")
    return plan


def _add_audio(plan: StreamPlan, out: av.container.OutputContainer, output: OutputFormat, s, codec, what) -> None:
    if codec in output.audio:
        plan.handlers[s.index] = _Copy(s, _from_template(out, s))
        plan.descriptions.append(f"{what} copied")
        return
    encoder = output.audio_encoder
    ctx = s.codec_context
    rate = ctx.sample_rate if encoder != "libopus" else 48000  # Opus runs at 48 kHz only
    target = out.add_stream(encoder, rate=rate)
    target.layout = ctx.layout.name if ctx.layout.nb_channels <= 8 else "7.1"
    if encoder != "flac":
        target.bit_rate = AUDIO_BIT_RATE
    _copy_metadata(s, target)
    plan.handlers[s.index] = _Audio(s, target)
    plan.descriptions.append(f"{what} re-encoded as {target.codec_context.name}")
    plan.notes.append(f"{what} re-encoded as {target.codec_context.name}: {output.description} cannot hold {codec}")


def _add_subtitle(plan: StreamPlan, out: av.container.OutputContainer, output: OutputFormat, s, codec, what) -> None:
    if codec in output.subtitles:
        plan.handlers[s.index] = _Copy(s, _from_template(out, s))
        plan.descriptions.append(f"{what} copied")
    elif codec in TEXT_SUBTITLES and output.text_subtitles is not None:
        target = out.add_mux_stream(output.text_subtitles)
        target.time_base = s.time_base
        _copy_metadata(s, target)
        plan.handlers[s.index] = _Text(s, target, output.text_subtitles)
        plan.descriptions.append(f"{what} converted to {output.text_subtitles}")
        plan.notes.append(
            f"{what} converted to {output.text_subtitles} (text and timing kept, styling dropped): "
            f"{output.description} cannot hold {codec}"
        )
    else:
        why = "it is not text" if codec not in TEXT_SUBTITLES else "it holds no text subtitles"
        plan.notes.append(f"{what} dropped: {output.description} cannot hold {codec} and {why}")


def _from_template(out: av.container.OutputContainer, s: av.stream.Stream) -> av.stream.Stream:
    target = out.add_stream_from_template(s)
    target.time_base = s.time_base
    _copy_metadata(s, target)
    return target


def _copy_metadata(source: av.stream.Stream, target: av.stream.Stream) -> None:
    """Language, title and the default/forced flags of a stream."""
    for key in ("language", "title", "handler_name"):
        if source.metadata.get(key):
            target.metadata[key] = source.metadata[key]
    target.disposition = source.disposition
