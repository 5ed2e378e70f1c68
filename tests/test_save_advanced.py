"""Save Image (Advanced): ComfyUI's V3 node with a DynamicCombo `format`, its dotted API keys and its files."""

from __future__ import annotations

import io
import json
import struct
from pathlib import Path
from typing import Any

import numpy as np
import OpenEXR
import pytest
from PIL import Image

from tests.workflows import validate
from zimage_serve import image_formats
from zimage_serve.engine.placement import Placement
from zimage_serve.workflow.execute import Executor, RunResult
from zimage_serve.workflow.folders import Folders
from zimage_serve.workflow.nodes import NODES
from zimage_serve.workflow.spec import object_info
from zimage_serve.workflow.ui_export import to_ui
from zimage_serve.workflow.ui_format import to_api

WIDTH, HEIGHT = 40, 24


@pytest.fixture(scope="module")
def executor(tmp_path_factory: pytest.TempPathFactory) -> Executor:
    folders = Folders.default(tmp_path_factory.mktemp("save-advanced"), [])
    folders.input.mkdir(parents=True)
    ramp = np.zeros((HEIGHT, WIDTH, 3), dtype=np.uint8)
    ramp[..., 0] = np.linspace(0, 255, WIDTH, dtype=np.uint8)[None, :]
    ramp[..., 1] = np.linspace(255, 0, HEIGHT, dtype=np.uint8)[:, None]
    ramp[..., 2] = 90
    Image.fromarray(ramp).save(folders.input / "ramp.png")
    return Executor(NODES, folders, Placement.choose("cpu"))


def graph(prefix: str, batch: int = 1, **format_inputs: Any) -> dict[str, Any]:
    """LoadImage → (a batch of it, brighter each time) → SaveImageAdvanced with these flat inputs."""
    prompt: dict[str, Any] = {"1": {"class_type": "LoadImage", "inputs": {"image": "ramp.png"}}}
    source = ["1", 0]
    for index in range(1, batch):
        prompt[f"b{index}"] = {"class_type": "ImageBatch", "inputs": {"image1": source, "image2": ["1", 0]}}
        source = [f"b{index}", 0]
    prompt["9"] = {
        "class_type": "SaveImageAdvanced",
        "inputs": {"images": source, "filename_prefix": prefix, **format_inputs},
    }
    return prompt


def run(executor: Executor, prompt: dict[str, Any]) -> tuple[RunResult, list[Path]]:
    checked = validate(prompt, executor.folders)
    assert checked.ok, (checked.error, checked.node_errors)
    result = executor.run("p", checked.prompt, checked.outputs, {"extra_pnginfo": {"workflow": {"k": 1}}}, None)
    assert result.ok, result.error
    files = [executor.folders.output / e["subfolder"] / e["filename"] for e in result.outputs["9"]["images"]]
    return result, files


def source_pixels(executor: Executor) -> np.ndarray:
    return np.asarray(Image.open(executor.folders.input / "ramp.png").convert("RGB"), dtype=np.float64) / 255


def test_object_info_describes_the_format_as_comfyuis_dynamic_combo(executor: Executor) -> None:
    info = object_info(NODES, executor.folders)["SaveImageAdvanced"]
    assert info["input_order"]["required"] == ["images", "filename_prefix", "format"]
    kind, spec = info["input"]["required"]["format"]
    assert kind == "COMFY_DYNAMICCOMBO_V3"
    options = {option["key"]: option["inputs"]["required"] for option in spec["options"]}
    assert list(options) == ["png", "exr", "avif"]
    assert options["png"]["bit_depth"] == [["8-bit", "16-bit"], {"default": "8-bit", "advanced": True}]
    assert options["exr"]["input_color_space"][0] == ["sRGB", "HDR", "linear"]
    assert options["avif"]["crf"][1]["default"] == 18
    save_mode = options["avif"]["save_mode"]
    assert save_mode[0] == "COMFY_DYNAMICCOMBO_V3"
    animated = next(o for o in save_mode[1]["options"] if o["key"] == "animated")["inputs"]["required"]
    assert animated["fps"][1]["default"] == 6.0 and animated["loop_count"][1]["max"] == 1000
    assert (info["output"], info["output_name"], info["output_node"]) == (["IMAGE"], ["images"], True)
    assert info["display_name"] == "Save Image (Advanced)" and info["category"] == "image"


def test_png_8_bit_is_saveimages_file_without_the_trailing_underscore(executor: Executor) -> None:
    _, [path] = run(executor, graph("adv8", **{"format": "png", "format.bit_depth": "8-bit"}))
    assert path.name == "adv8_00001.png"
    picture = Image.open(path)
    assert picture.mode == "RGB" and json.loads(picture.info["workflow"]) == {"k": 1}
    assert json.loads(picture.info["prompt"])["9"]["class_type"] == "SaveImageAdvanced"
    assert np.array_equal(np.asarray(picture), np.asarray(Image.open(executor.folders.input / "ramp.png")))
    _, [second] = run(executor, graph("adv8b", format="png"))  # the dotted inputs left out: their defaults
    assert second.name == "adv8b_00001.png" and Image.open(second).mode == "RGB"


def test_png_16_bit_truncates_as_comfyui_and_keeps_the_graph(executor: Executor) -> None:
    _, [path] = run(executor, graph("adv16", **{"format": "png", "format.bit_depth": "16-bit"}))
    data = path.read_bytes()
    assert data[24] == 16 and data[25] == 2  # IHDR: 16 bits a sample, RGB
    assert data[37:41] == b"tEXt"  # the graph right after the header, as ComfyUI writes it
    picture = Image.open(path)
    assert json.loads(picture.info["workflow"]) == {"k": 1}
    rows = np.frombuffer(_png16_samples(data), dtype=">u2").reshape(HEIGHT, WIDTH, 3)
    expected = np.floor(np.clip(source_pixels(executor).astype(np.float32) * 65535, 0, 65535))
    assert np.array_equal(rows, expected.astype(np.uint16))


def _png16_samples(data: bytes) -> bytes:
    """The unfiltered samples of a PNG (filter bytes stripped; the encoder may choose any filter)."""
    import zlib

    position, idat = 8, b""
    while position < len(data):
        length, kind = struct.unpack(">I4s", data[position : position + 8])
        if kind == b"IDAT":
            idat += data[position + 8 : position + 8 + length]
        position += 12 + length
    raw = zlib.decompress(idat)
    stride, pixel = WIDTH * 6, 6
    rows, previous = [], bytearray(stride)
    for row in range(HEIGHT):
        kind, line = raw[row * (stride + 1)], bytearray(raw[row * (stride + 1) + 1 : (row + 1) * (stride + 1)])
        for i in range(stride):
            left = line[i - pixel] if i >= pixel else 0
            up, corner = previous[i], previous[i - pixel] if i >= pixel else 0
            if kind == 1:
                line[i] = (line[i] + left) & 255
            elif kind == 2:
                line[i] = (line[i] + up) & 255
            elif kind == 3:
                line[i] = (line[i] + (left + up) // 2) & 255
            elif kind == 4:
                p = left + up - corner
                guess = min((abs(p - left), 0, left), (abs(p - up), 1, up), (abs(p - corner), 2, corner))[2]
                line[i] = (line[i] + guess) & 255
        rows.append(bytes(line))
        previous = line
    return b"".join(rows)


@pytest.mark.parametrize(("space", "chromaticities"), [("sRGB", image_formats.REC709), ("HDR", image_formats.REC2020)])
def test_exr_is_scene_linear_float_with_the_graph_in_its_header(
    executor: Executor, tmp_path: Path, space: str, chromaticities: Any
) -> None:
    _, [path] = run(executor, graph(f"exr-{space}", **{"format": "exr", "format.input_color_space": space}))
    assert path.suffix == ".exr" and path.name == f"exr-{space}_00001.exr"
    exr = OpenEXR.File(str(path))
    header = exr.header()
    assert json.loads(header["workflow"]) == {"k": 1} and "SaveImageAdvanced" in header["prompt"]
    assert np.allclose(header["chromaticities"], [v for xy in chromaticities for v in xy], atol=1e-6)
    pixels = exr.channels()["RGB"].pixels
    assert pixels.dtype == np.float32 and pixels.shape == (HEIGHT, WIDTH, 3)
    signal = source_pixels(executor)
    if space == "sRGB":  # 0.5 → 0.214, 1 → 1: the sRGB curve undone
        expected = np.where(signal <= 0.04045, signal / 12.92, ((signal + 0.055) / 1.055) ** 2.4)
    else:  # HLG: the square law below 1/2, then the log segment; 1 → 1
        a = 0.17883277
        expected = np.where(signal <= 0.5, signal**2 / 3, (np.exp((signal - 0.55991073) / a) + 0.28466892) / 12)
    assert np.allclose(pixels, expected, atol=1e-5)
    assert float(pixels.max()) == pytest.approx(1.0, abs=1e-5)


def test_exr_linear_input_is_written_as_it_is(executor: Executor) -> None:
    _, [path] = run(executor, graph("exr-lin", **{"format": "exr", "format.input_color_space": "linear"}))
    pixels = OpenEXR.File(str(path)).channels()["RGB"].pixels
    assert np.allclose(pixels, source_pixels(executor), atol=1e-6)


@pytest.mark.parametrize("depth", ["8-bit YUV420", "10-bit YUV420"])
def test_avif_stills_carry_the_graph_in_exif_as_comfyuis_frontend_reads_it(executor: Executor, depth: str) -> None:
    flat = {"format": "avif", "format.bit_depth": depth, "format.crf": 10, "format.save_mode": "still images"}
    result, paths = run(executor, graph(f"avif-{depth[:2]}", batch=2, **flat))
    assert [p.name for p in paths] == [f"avif-{depth[:2]}_00001.avif", f"avif-{depth[:2]}_00002.avif"]
    assert all(p.suffix == ".avif" for p in paths) and "animated" not in result.outputs["9"]
    picture = Image.open(paths[0])
    exif = picture.getexif()
    assert exif[0x0110].startswith("prompt:") and json.loads(exif[0x0110].removeprefix("prompt:"))["9"]
    assert exif[0x010F] == 'workflow:{"k": 1}'
    decoded = np.asarray(picture.convert("RGB"), dtype=np.float64) / 255
    assert np.abs(decoded - source_pixels(executor)).mean() < 0.02  # a smooth ramp survives crf 10


def test_animated_avif_is_one_file_of_all_the_images(executor: Executor) -> None:
    flat = {"format": "avif", "format.save_mode": "animated", "format.save_mode.fps": 12.0}
    result, [path] = run(executor, graph("anim", batch=3, **flat))
    assert result.outputs["9"]["animated"] == [True]
    data = path.read_bytes()
    assert data[8:12] == b"avif" and b"avis" in data[16:40]  # still-image brand first, sequence compatible
    assert Image.open(path).getexif()[0x010F] == 'workflow:{"k": 1}'
    sizes = data.index(b"stsz")  # the sequence's sample table: one sample a frame
    assert struct.unpack(">I", data[sizes + 12 : sizes + 16])[0] == 3


def test_batch_num_names_each_image(executor: Executor) -> None:
    _, paths = run(executor, graph("shot-%batch_num%", batch=2, format="png"))
    assert [p.name for p in paths] == ["shot-0_00001.png", "shot-1_00001.png"]
    prompt = graph("classic-%batch_num%", batch=2, format="png")
    prompt["9"] = {"class_type": "SaveImage", "inputs": {"images": prompt["9"]["inputs"]["images"],
                                                        "filename_prefix": "classic-%batch_num%"}}  # fmt: skip
    _, paths = run(executor, prompt)
    assert [p.name for p in paths] == ["classic-0_00001_.png", "classic-1_00001_.png"]


@pytest.mark.parametrize(
    ("inputs", "field", "kind"),
    [
        ({"format": "tiff"}, "format", "value_not_in_list"),
        ({"format": "png", "format.bit_depth": "12-bit"}, "format.bit_depth", "value_not_in_list"),
        ({"format": "avif", "format.crf": 99}, "format.crf", "value_bigger_than_max"),
        ({"format": "avif", "format.crf": "x"}, "format.crf", "invalid_input_type"),
    ],
)
def test_a_bad_choice_is_refused_by_its_dotted_name(
    executor: Executor, inputs: dict[str, Any], field: str, kind: str
) -> None:
    checked = validate(graph("bad", **inputs), executor.folders)
    assert not checked.ok
    [error] = checked.node_errors["9"]["errors"]
    assert error["type"] == kind and error["extra_info"]["input_name"] == field


def test_keys_of_an_option_not_chosen_are_ignored(executor: Executor) -> None:
    _, [path] = run(executor, graph("ignored", **{"format": "png", "format.crf": 5, "format.fps": "x"}))
    assert path.suffix == ".png"


def test_the_ui_format_lists_the_chosen_options_widgets_after_it(executor: Executor) -> None:
    ui = {
        "nodes": [
            {"id": 1, "type": "LoadImage", "inputs": [], "outputs": [{"name": "IMAGE", "links": [1]}],
             "widgets_values": ["ramp.png", "image"], "mode": 0},
            {"id": 2, "type": "SaveImageAdvanced", "inputs": [{"name": "images", "link": 1}], "outputs": [],
             "widgets_values": ["Z_image_base_int8", "png", "8-bit", "sRGB"], "mode": 0},
        ],
        "links": [[1, 1, 0, 2, 0, "IMAGE"]],
    }  # fmt: skip
    prompt = to_api(ui, NODES)
    assert prompt["2"]["inputs"] == {
        "images": ["1", 0],
        "filename_prefix": "Z_image_base_int8",
        "format": "png",
        "format.bit_depth": "8-bit",
        "format.input_color_space": "sRGB",
    }
    avif = dict(ui, nodes=[ui["nodes"][0], dict(ui["nodes"][1], widgets_values=["a", "avif", "auto", "HDR", 30,
                                                                                  "animated", 8.0, 2])])  # fmt: skip
    inputs = to_api(avif, NODES)["2"]["inputs"]
    assert inputs["format.save_mode"] == "animated" and inputs["format.save_mode.loop_count"] == 2
    assert inputs["format.crf"] == 30 and inputs["format.input_color_space"] == "HDR"
    back = to_ui(to_api(avif, NODES), NODES)  # and out again, in the same order
    [saver] = [n for n in back["nodes"] if n["type"] == "SaveImageAdvanced"]
    assert saver["widgets_values"] == ["a", "avif", "auto", "HDR", 30, "animated", 8.0, 2]


def test_its_image_output_passes_the_images_on(executor: Executor) -> None:
    prompt = graph("chain", format="png")
    prompt["10"] = {"class_type": "SaveImage", "inputs": {"images": ["9", 0], "filename_prefix": "after"}}
    checked = validate(prompt, executor.folders)
    assert checked.ok, checked.node_errors
    result = executor.run("chain", checked.prompt, checked.outputs, {}, None)
    assert result.ok and result.outputs["10"]["images"][0]["filename"] == "after_00001_.png"


def test_exif_goes_into_an_avif_that_has_item_references_already() -> None:
    """A second EXIF item: the existing references box is extended, every offset still points right."""
    rgb = np.linspace(0, 1, 16 * 16 * 3, dtype=np.float32).reshape(16, 16, 3)
    first = image_formats.avif_bytes([rgb], "auto", "sRGB", 20, {"prompt": "{}"})  # has an iref box now
    second = image_formats.with_avif_exif(first, image_formats.exif_payload({"prompt": '{"x": 1}'}))
    meta = next(box for box in image_formats._boxes(second, 0, len(second)) if box[2] == b"meta")
    children = {kind: (at, size) for at, size, kind, _ in image_formats._boxes(second, meta[0] + 12, meta[0] + meta[1])}
    iref_at, iref_size = children[b"iref"]
    assert second[iref_at : iref_at + iref_size].count(b"cdsc") == 2 and second.count(b"Exif\0") >= 2
    exif_items = image_formats._iloc_with(second, (*children[b"iloc"], 8), 0, len(second), 0, 0)[1]
    assert len(exif_items) == 3  # the image and both EXIF items
    assert Image.open(io.BytesIO(second)).getexif()[0x0110] == 'prompt:{"x": 1}'  # libavif reads the added one
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(second))), np.asarray(Image.open(io.BytesIO(first))))


def test_set_reaches_a_dotted_input(executor: Executor) -> None:
    from zimage_serve.workflow.overrides import apply_overrides

    prompt = graph("set", format="avif")
    apply_overrides(prompt, ["9.format.crf=20", "9.format.save_mode=animated"], NODES)
    assert prompt["9"]["inputs"]["format.crf"] == 20 and prompt["9"]["inputs"]["format.save_mode"] == "animated"


def test_texts_never_replace_the_exr_attributes_and_extra_exif_keys_are_bounded(
    executor: Executor, tmp_path: Path
) -> None:
    pixels = source_pixels(executor).astype(np.float32)
    data = image_formats.exr_bytes(pixels, "linear", {"channels": "x", "dataWindow": "y", "workflow": "{}"})
    path = tmp_path / "attributes.exr"
    path.write_bytes(data)
    exr = OpenEXR.File(str(path))
    assert exr.channels()["RGB"].pixels.shape == (HEIGHT, WIDTH, 3) and exr.header()["workflow"] == "{}"
    texts = {"prompt": "{}", **{f"key{i}": f'"{i}"' for i in range(6)}}
    exif = Image.Exif()
    exif.load(b"Exif\0\0" + image_formats.exif_payload(texts)[4:])
    assert [exif[t] for t in (0x010F, 0x010E, 0x010D)] == ['key0:"0"', 'key1:"1"', 'key2:"2"'] and 0x010C not in exif


def test_a_linked_value_out_of_range_is_refused_when_it_arrives(executor: Executor) -> None:
    Image.new("RGB", (100, 8), "white").save(executor.folders.input / "wide.png")
    prompt = graph("linked", format="avif")
    prompt["20"] = {"class_type": "LoadImage", "inputs": {"image": "wide.png"}}
    prompt["21"] = {"class_type": "GetImageSize", "inputs": {"image": ["20", 0]}}
    prompt["9"]["inputs"]["format.crf"] = ["21", 0]  # 100: past crf's 63
    checked = validate(prompt, executor.folders)
    assert checked.ok, checked.node_errors
    result = executor.run("linked", checked.prompt, checked.outputs, {}, None)
    assert not result.ok and "format.crf" in json.dumps(result.error)
    tiny = graph("tiny", format="avif")
    Image.new("RGB", (2, 2), "white").save(executor.folders.input / "dot.png")
    tiny["1"]["inputs"]["image"] = "dot.png"
    checked = validate(tiny, executor.folders)
    result = executor.run("tiny", checked.prompt, checked.outputs, {}, None)
    assert not result.ok and "format" in json.dumps(result.error) and "Traceback" not in json.dumps(result.error)
