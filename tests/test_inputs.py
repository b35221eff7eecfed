"""pipeline.inference.inputs: user files give exactly extract's frame and mel, or one clear error.

Every input is made here (Pillow, numpy, the bundled ffmpeg with lavfi sources); the reference
is the extract stage's own code run on the same files.
"""

from __future__ import annotations

import dataclasses
import functools
import subprocess
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.config import load_params
from pipeline.data import audio, decode, extracted
from pipeline.inference import inputs
from pipeline.inference.inputs import InputError, list_inputs, load_image, load_mel, load_pair
from pipeline.media import ffmpeg_exe

ROOT = Path(__file__).resolve().parents[1]
# The repo's extract params on a 2-s clip: 1 + 44100 // 256 = 173 STFT frames, 171 after the
# trim, of which the centre 160 are kept (crop from frame 5).
CFG = dataclasses.replace(
    load_params(ROOT / "params.yaml").extract,
    clip_seconds=2.0,
    mel_frames=160,
    image_size=32,
    workers=1,
)
SR = CFG.sample_rate
CHIRP = "aevalsrc=0.5*sin(2*PI*(300+600*t)*t):s=44100"  # 44.1 kHz: extract resamples it


def ff(*args: str) -> None:
    subprocess.run(
        [ffmpeg_exe(), "-hide_banner", "-loglevel", "error", "-nostdin", "-y", *args],
        check=True,
        capture_output=True,
        timeout=60,
    )


@functools.cache
def encoders() -> str:
    out = subprocess.run([ffmpeg_exe(), "-hide_banner", "-encoders"], capture_output=True)
    return out.stdout.decode()


def colour_clip(out: Path, colours: list[tuple[str, float]], sound: bool = True) -> None:
    """Solid colours one after another (ffmpeg names, seconds) at 25 fps, 64x48, with a chirp
    track. ("lime" is pure green; ffmpeg's "green" is half bright.)"""
    parts = [f"color=c={c}:s=64x48:r=25:d={d}[v{i}]" for i, (c, d) in enumerate(colours)]
    joined = "".join(f"[v{i}]" for i in range(len(colours)))
    graph = ";".join(parts) + f";{joined}concat=n={len(colours)}:v=1:a=0[out0]"
    seconds = sum(d for _, d in colours)
    args = ["-f", "lavfi", "-i", graph]
    if sound:
        args += ["-f", "lavfi", "-i", f"{CHIRP}:d={seconds}", "-c:a", "aac"]
    ff(*args, "-c:v", "libx264", "-preset", "ultrafast", "-pix_fmt", "yuv420p", str(out))


def colour_of(frame: np.ndarray) -> str:
    r, g, b = frame.reshape(-1, 3).mean(axis=0)
    assert max(r, g, b) > 150, (r, g, b)
    return ("red", "green", "blue")[int(np.argmax([r, g, b]))]


def extract_frame(path: Path) -> np.ndarray:
    """The frame extract stores for `path` with one frame per clip, read back by `decode_row`."""
    data = decode.extract_clip(path, dataclasses.replace(CFG, num_frames=1))
    frames, _ = extracted.decode_row(data.frames, data.mel.astype("<f2").tobytes(), data.mel.shape)
    return frames[0]


def stored_mel(path: Path) -> tuple[np.ndarray, list[str]]:
    """The mel extract writes for `path`, read back the way `iter_examples` does; its flags."""
    data = decode.extract_clip(path, CFG)
    _, mel = extracted.decode_row(data.frames, data.mel.astype("<f2").tobytes(), data.mel.shape)
    return mel, data.flags


def pcm_mel(wave: np.ndarray) -> np.ndarray:
    """log_mel of `wave` as a 16-bit WAV holds it (ffmpeg reads s16 as x / 32768), in float16."""
    pcm = (np.clip(wave, -1, 1) * 32767.0).round() / 32768.0
    return audio.log_mel(pcm.astype(np.float32), CFG).astype(np.float16).astype(np.float32)


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height and whose image data is empty."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        crc = zlib.crc32(kind + body).to_bytes(4, "big")
        return len(body).to_bytes(4, "big") + kind + body + crc

    ihdr = width.to_bytes(4, "big") + height.to_bytes(4, "big") + bytes([8, 2, 0, 0, 0])
    head = chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")
    return b"\x89PNG\r\n\x1a\n" + head


def chirp(seconds: float) -> np.ndarray:
    t = np.arange(int(seconds * SR)) / SR
    return 0.5 * np.sin(2 * np.pi * (200 + 900 * t) * t) * (0.6 + 0.4 * np.sin(7 * t))


@pytest.fixture(scope="module")
def media_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Clips shared by several tests; see each name's comment."""
    d = tmp_path_factory.mktemp("inputs-media")
    # 3 s: the clip is the first 2 s, whose middle (1.0 s) is green; the file's middle is blue.
    colour_clip(d / "long.mp4", [("red", 0.6), ("lime", 0.8), ("blue", 1.6)])
    # 1.2 s: shorter than the clip, so the header's duration sets D (middle 0.6 s: green).
    colour_clip(d / "short.mp4", [("red", 0.4), ("lime", 0.4), ("blue", 0.4)])
    # A WebM written to a pipe has no duration in its header, so fps=1/clip_seconds yields no
    # frame from its 0.6 s; no audio track.
    webm = subprocess.run(
        [
            ffmpeg_exe(), "-hide_banner", "-loglevel", "error", "-f", "lavfi", "-i",
            "color=c=red:s=64x48:r=25:d=0.2[a];color=c=lime:s=64x48:r=25:d=0.2[b];"
            "color=c=blue:s=64x48:r=25:d=0.2[c];[a][b][c]concat=n=3:v=1:a=0[out0]",
            "-c:v", "libvpx", "-f", "webm", "pipe:1",
        ],
        capture_output=True, check=True, timeout=60,
    ).stdout  # fmt: skip
    (d / "noduration.webm").write_bytes(webm)
    return d


# ------------------------------------------------------------------------------------ images


def test_image_formats_give_an_rgb_square(tmp_path: Path) -> None:
    colour = np.array([200, 40, 90])
    img = Image.new("RGB", (48, 40), tuple(int(c) for c in colour))
    for name in ("a.png", "a.jpg", "a.webp"):
        img.save(tmp_path / name)
        out = load_image(tmp_path / name, CFG)
        assert out.shape == (32, 32, 3) and out.dtype == np.uint8, name
        assert np.abs(out.astype(int) - colour).max() <= 8, name


@pytest.mark.parametrize("size", [(128, 64), (64, 128)])
def test_wide_and_tall_images_keep_the_centre(tmp_path: Path, size: tuple[int, int]) -> None:
    # Quarters red | green | green | blue along the long side: the centre crop is all green.
    w, h = size
    pixels = np.zeros((h, w, 3), np.uint8)
    pixels[..., 1] = 255
    if w > h:
        pixels[:, : w // 4], pixels[:, 3 * w // 4 :] = (255, 0, 0), (0, 0, 255)
    else:
        pixels[: h // 4], pixels[3 * h // 4 :] = (255, 0, 0), (0, 0, 255)
    Image.fromarray(pixels).save(tmp_path / "wide.png")
    out = load_image(tmp_path / "wide.png", CFG).astype(int)
    assert (out[..., 1] > 230).all() and (out[..., 0] < 25).all() and (out[..., 2] < 25).all()


@pytest.mark.parametrize("size", [(97, 61), (61, 97), (300, 37)])
def test_image_resize_matches_extracts_filter(tmp_path: Path, size: tuple[int, int]) -> None:
    # The same texture as a lossless 2-s video through extract's own ffmpeg command. Sizes with
    # a half-pixel crop offset catch its rounding: a crop one pixel off differs by >= 13 on
    # average, while Pillow's bicubic and ffmpeg's, each after the JPEG round trip, differ by 2.
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w]
    tex = np.stack(
        [127 + 120 * np.sin(xx / 2.3 + yy / 5), 127 + 120 * np.cos(yy / 1.7), xx * 255 / w], -1
    ).astype(np.uint8)
    Image.fromarray(tex).save(tmp_path / "tex.png")
    ff(
        "-loop", "1", "-framerate", "10", "-i", str(tmp_path / "tex.png"),
        "-f", "lavfi", "-i", f"{CHIRP}:d=2", "-t", "2",
        "-c:v", "ffv1", "-pix_fmt", "bgr0", "-c:a", "flac", str(tmp_path / "tex.mkv"),
    )  # fmt: skip
    ref = extract_frame(tmp_path / "tex.mkv").astype(int)
    diff = np.abs(load_image(tmp_path / "tex.png", CFG).astype(int) - ref)
    assert diff.mean() < 3 and diff.max() <= 16
    assert np.array_equal(load_image(tmp_path / "tex.mkv", CFG), ref)


def test_palette_alpha_grey_and_16_bit_become_rgb(tmp_path: Path) -> None:
    pal = Image.new("P", (32, 32), 1)
    pal.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
    pal.save(tmp_path / "palette.png")
    pal.save(tmp_path / "palette-transparent.png", transparency=1)
    rgba = np.zeros((32, 32, 4), np.uint8)
    rgba[:, :16] = (255, 0, 0, 255)  # opaque red left, fully transparent blue right
    rgba[:, 16:] = (0, 0, 255, 0)
    Image.fromarray(rgba, "RGBA").save(tmp_path / "alpha.png")
    Image.new("L", (40, 32), 77).save(tmp_path / "grey.png")
    Image.fromarray(np.full((32, 32), 51400, np.uint16)).save(tmp_path / "grey16.png")

    def near(name: str, y: int, x: int, rgb: tuple[int, int, int]) -> bool:
        out = load_image(tmp_path / name, CFG)
        assert out.shape == (32, 32, 3) and out.dtype == np.uint8
        return np.abs(out[y, x].astype(int) - rgb).max() <= 3  # the JPEG round trip

    assert near("palette.png", 16, 16, (10, 200, 30))
    assert near("palette-transparent.png", 16, 16, (255, 255, 255))
    assert near("alpha.png", 16, 4, (255, 0, 0)) and near("alpha.png", 16, 28, (255, 255, 255))
    assert near("grey.png", 16, 16, (77, 77, 77))
    assert near("grey16.png", 16, 16, (200, 200, 200))  # 51400 / 257, not clipped to 255


def test_exif_rotation_is_applied(tmp_path: Path) -> None:
    # Stored 64x32, left red, right blue; orientation 6 shows it turned 90° clockwise, so the
    # viewer sees red on top and blue below.
    pixels = np.zeros((32, 64, 3), np.uint8)
    pixels[:, :32], pixels[:, 32:] = (255, 0, 0), (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(pixels).save(tmp_path / "phone.jpg", exif=exif, quality=95)
    out = load_image(tmp_path / "phone.jpg", CFG)
    assert colour_of(out[2:6, 2:30]) == "red" and colour_of(out[26:30, 2:30]) == "blue"


# ------------------------------------------------------------------------------------ video


def test_video_gives_the_middle_frame_of_the_clip(media_dir: Path) -> None:
    for name in ("long.mp4", "short.mp4"):
        frame = load_image(media_dir / name, CFG)
        assert frame.shape == (32, 32, 3) and frame.dtype == np.uint8
        assert colour_of(frame) == "green", name
        assert np.array_equal(frame, extract_frame(media_dir / name)), name
    # No duration in the header: every frame is decoded and the middle one kept.
    assert colour_of(load_image(media_dir / "noduration.webm", CFG)) == "green"


def test_load_pair_is_load_image_and_load_mel(media_dir: Path) -> None:
    frame, mel = load_pair(media_dir / "long.mp4", CFG)
    assert np.array_equal(frame, load_image(media_dir / "long.mp4", CFG))
    assert np.array_equal(mel, load_mel(media_dir / "long.mp4", CFG))


# ------------------------------------------------------------------------------------ audio


@pytest.mark.parametrize("name", ["long.mp4", "short.mp4"])
def test_mel_of_a_video_is_what_extract_stores(media_dir: Path, name: str) -> None:
    mel = load_mel(media_dir / name, CFG)
    ref, flags = stored_mel(media_dir / name)
    assert mel.shape == (CFG.n_mels, CFG.mel_frames) and mel.dtype == np.float32
    assert mel.std() > 0.05 and mel.min() >= 0.0 and mel.max() <= 1.0  # a real, non-blank mel
    assert np.array_equal(mel, ref)
    assert ("looped_audio" in flags) == (name == "short.mp4")  # both padding paths are covered


@pytest.mark.parametrize("seconds", [3.0, 1.3])
def test_mel_of_a_wav_is_log_mel_of_its_samples(tmp_path: Path, seconds: float) -> None:
    # 3 s is cut to the clip's 2 s, 1.3 s is looped, both inside log_mel as extract does.
    wave = chirp(seconds)
    audio.save_wav(tmp_path / "a.wav", wave, SR)
    mel = load_mel(tmp_path / "a.wav", CFG)
    assert np.array_equal(mel, pcm_mel(wave))
    exact = audio.log_mel(wave, CFG)  # before 16-bit quantisation: only the faintest bins move
    assert np.abs(mel - exact).mean() < 2e-3


def test_compressed_audio_formats(tmp_path: Path) -> None:
    wave = chirp(2.5)
    audio.save_wav(tmp_path / "a.wav", wave, SR)
    ref = load_mel(tmp_path / "a.wav", CFG)
    ff("-i", str(tmp_path / "a.wav"), "-c:a", "flac", str(tmp_path / "a.flac"))
    assert np.array_equal(load_mel(tmp_path / "a.flac", CFG), ref)  # lossless: the same samples
    # libvorbis rejects a bit rate for 22.05 kHz mono; a quality level suits every rate.
    lossy = {"a.mp3": ("libmp3lame", "-b:a", "128k"), "a.ogg": ("libvorbis", "-q:a", "6")}
    lossy["a.m4a"] = ("aac", "-b:a", "128k")
    missing = [enc for enc, *_ in lossy.values() if f" {enc} " not in encoders()]
    for name, (enc, *rate) in lossy.items():
        if enc in missing:
            continue
        ff("-i", str(tmp_path / "a.wav"), "-c:a", enc, *rate, str(tmp_path / name))
        mel = load_mel(tmp_path / name, CFG)
        assert mel.shape == ref.shape and np.abs(mel - ref).mean() < 0.03, name
    if missing:
        pytest.skip(f"this ffmpeg lacks {', '.join(missing)}; the other formats passed")


@pytest.mark.parametrize("name", ["long.mp4", "short.mp4"])
def test_a_sound_is_looped_when_extract_loops_it(media_dir: Path, name: str) -> None:
    sound = inputs.load_sound(media_dir / name, CFG)
    assert np.array_equal(sound.mel, load_mel(media_dir / name, CFG))
    assert sound.looped == ("looped_audio" in stored_mel(media_dir / name)[1])
    assert sound.seconds == pytest.approx(min(CFG.clip_seconds, 3.0 if name == "long.mp4" else 1.2),
                                          abs=0.05)  # fmt: skip


@pytest.fixture(scope="module")
def truncated_mp4(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 4-s MP4 (header first) cut to 30 % of its bytes: about 0.8 s of it decodes."""
    d = tmp_path_factory.mktemp("truncated")
    ff("-f", "lavfi", "-i", "testsrc2=size=64x48:rate=10", "-f", "lavfi", "-i",
       "sine=sample_rate=22050", "-t", "4", "-c:v", "libx264", "-pix_fmt", "yuv420p",
       "-c:a", "aac", "-movflags", "+faststart", str(d / "full.mp4"))  # fmt: skip
    data = (d / "full.mp4").read_bytes()
    (d / "truncated.mp4").write_bytes(data[: int(len(data) * 0.3)])
    return d / "truncated.mp4"


def test_a_truncated_video_is_refused_as_extract_refuses_it(truncated_mp4: Path) -> None:
    with pytest.raises(decode.ClipError, match="truncated"):  # the stage's verdict
        decode.extract_clip(truncated_mp4, CFG)
    for loader in (load_image, load_mel, load_pair):
        with pytest.raises(InputError, match="truncated") as info:
            loader(truncated_mp4, CFG)
        assert str(truncated_mp4) in str(info.value) and "\n" not in str(info.value)
    # the whole file is fine
    load_pair(truncated_mp4.with_name("full.mp4"), CFG)


@pytest.mark.parametrize("seconds", [0.14, 0.9])
def test_a_sound_under_extracts_minimum_is_refused(tmp_path: Path, seconds: float) -> None:
    audio.save_wav(tmp_path / "short.wav", chirp(seconds), SR)
    with pytest.raises(InputError, match="too short") as info:
        load_mel(tmp_path / "short.wav", CFG)
    assert f"{decode.MIN_SECONDS:g} s" in str(info.value)


# ------------------------------------------------------------------------------------ errors


def _errors(d: Path, media_dir: Path) -> list[tuple[Callable[..., object], Path, str]]:
    """(loader, file, words the message must hold), each file made here."""
    d.mkdir()
    (d / "empty.png").write_bytes(b"")
    (d / "empty.wav").write_bytes(b"")
    for name in ("text.png", "text.wav", "text.mp4"):
        (d / name).write_text("hello, I am not media\n")
    Image.new("RGB", (32, 32), (9, 9, 9)).save(d / "ok.png")
    (d / "truncated.png").write_bytes((d / "ok.png").read_bytes()[:60])
    (d / "zero.png").write_bytes(png_header_only(0, 8))
    audio.save_wav(d / "tone.wav", chirp(1.0), SR)
    audio.save_wav(d / "zeros.wav", np.zeros(SR), SR)
    audio.save_wav(d / "quiet.wav", 5e-5 * np.sin(np.arange(SR) / 3), SR)  # -86 dBFS
    audio.save_wav(d / "nothing.wav", np.zeros(0), SR)
    return [
        (load_image, d / "missing.png", "does not exist"),
        (load_mel, d / "missing.wav", "does not exist"),
        (load_image, d, "is a folder"),
        (load_mel, d, "is a folder"),
        (load_image, d / "empty.png", "is empty"),
        (load_mel, d / "empty.wav", "is empty"),
        (load_image, d / "text.png", "is not a readable image"),
        (load_image, d / "truncated.png", "is not a readable image"),
        (load_image, d / "zero.png", "is not a readable image"),
        (load_image, d / "text.mp4", "is not a readable image or video file"),
        (load_mel, d / "text.wav", "is not a readable audio or video file"),
        (load_pair, d / "text.mp4", "is not a readable video file"),
        (load_image, d / "tone.wav", "has no video stream"),
        (load_pair, d / "tone.wav", "has no video stream"),
        (load_mel, d / "ok.png", "has no audio stream"),
        (load_mel, media_dir / "noduration.webm", "has no audio stream"),
        (load_mel, d / "zeros.wav", "is silent"),
        (load_mel, d / "quiet.wav", "is silent"),
        (load_mel, d / "nothing.wav", "contains no audio samples"),
    ]


def test_every_input_problem_is_one_sentence_naming_the_file(
    tmp_path: Path, media_dir: Path
) -> None:
    cases = _errors(tmp_path / "bad", media_dir)
    for loader, path, words in cases:
        with pytest.raises(InputError) as info:
            loader(path, CFG)
        message = str(info.value)
        assert words in message and str(path) in message and "\n" not in message, message


def test_quiet_but_audible_sound_is_accepted(tmp_path: Path) -> None:
    # -70 dBFS: below extract's training threshold (-60 dBFS), above this module's (-80 dBFS).
    audio.save_wav(tmp_path / "quiet.wav", 3e-4 * np.sin(np.arange(SR) / 3), SR)
    mel = load_mel(tmp_path / "quiet.wav", CFG)
    assert mel.max() > 0.05
    assert inputs.SILENCE_PEAK < decode.SILENCE_PEAK


# ------------------------------------------------------------------------------------ listing


def test_list_inputs(tmp_path: Path) -> None:
    for name in ("a.png", "B.JPG", "c.wav", "d.mp4", "notes.txt", ".hidden.png", "._e.jpg"):
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "folder.png").mkdir()
    assert list_inputs(tmp_path, ["image"]) == [tmp_path / "B.JPG", tmp_path / "a.png"]
    assert list_inputs(tmp_path, {"audio", "video"}) == [tmp_path / "c.wav", tmp_path / "d.mp4"]
    assert list_inputs(tmp_path / "notes.txt", ["image"]) == [tmp_path / "notes.txt"]
    for missing in (tmp_path / "folder.png", tmp_path / "nope"):
        with pytest.raises(InputError, match="no image files|does not exist") as info:
            list_inputs(missing, ["image"])
        assert str(missing) in str(info.value) and "\n" not in str(info.value)
    with pytest.raises(ValueError, match="kinds"):
        list_inputs(tmp_path, ["pictures"])
