"""engines.manifest: round trip, validation messages that name the key, file verification."""

from __future__ import annotations

import copy
import json

import pytest

from engines.errors import IntegrityError, ManifestError
from engines.manifest import (
    FORMAT_VERSION,
    ExpertInfo,
    FileRef,
    Manifest,
    RouterInfo,
    SchedulerInfo,
    TextEncoderInfo,
    TokenizerInfo,
    VaeDecoderInfo,
    read_manifest,
    sha256_file,
    verify_files,
)


@pytest.fixture
def export(tmp_path):
    """A manifest over small dummy files (the runtime tests use real graphs)."""
    names = ["router.onnx", "text_encoder.onnx", "tokenizer/tokenizer.json", "experts/expert_00.onnx",
             "experts/expert_01.onnx"]
    for i, n in enumerate(names):
        p = tmp_path / n
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(bytes([i]) * (100 + i))
    ref = lambda n: FileRef.of(tmp_path, n)  # noqa: E731
    m = Manifest(
        base_model="toy", precision="fp32", scheduler=SchedulerInfo("pndm", {"beta_schedule": "linear"}),
        budget=0.6, dense_macs=1e9, text_len=16, sample_size=(32, 32), in_channels=3, latent=False,
        router=RouterInfo({"onnx": ref("router.onnx")}, max_length=256, num_experts=2, embedding_dim=384),
        text_encoder=TextEncoderInfo({"onnx": ref("text_encoder.onnx")}, hidden_size=384),
        tokenizer=TokenizerInfo({"json": ref("tokenizer/tokenizer.json")}),
        experts=[ExpertInfo(i, 5e8, 0.5, 1000, 0.5, {"onnx": ref(f"experts/expert_0{i}.onnx")}) for i in (0, 1)],
        info={"run": "test"},
    )
    (tmp_path / "manifest.json").write_text(json.dumps(m.to_dict()))
    return tmp_path, m


def test_round_trip_and_verify(export):
    d, m = export
    back = read_manifest(d)
    assert back == m
    assert back.format_version == FORMAT_VERSION
    assert [f.path for f in back.all_files()][:2] == ["router.onnx", "text_encoder.onnx"]
    verify_files(d, back)
    assert FileRef.of(d, "router.onnx").sha256 == sha256_file(d / "router.onnx")


def _broken(m: Manifest, edit) -> dict:
    data = copy.deepcopy(m.to_dict())
    edit(data)
    return data


@pytest.mark.parametrize("edit, match", [
    (lambda d: d.pop("experts"), "missing key 'experts'"),
    (lambda d: d.update(surprise=1), "unknown key\\(s\\) 'surprise'"),
    (lambda d: d.update(format_version="1"), "format_version '1' is not supported"),
    (lambda d: d.pop("format_version"), "format_version None is not supported"),
    (lambda d: d.update(precision="int8"), "precision: 'int8' is not one of fp32, fp16"),
    (lambda d: d.update(budget=1.5), "budget: 1.5 is outside"),
    (lambda d: d.update(sample_size=[32]), "sample_size"),
    (lambda d: d["experts"][1].update(macs="big"), "experts\\[1\\].macs: expected a number"),
    (lambda d: d["experts"][1].update(id=5), "ids must be 0..1 in order"),
    (lambda d: d["experts"][0]["files"]["onnx"].update(sha256="xyz"), "experts\\[0\\].files.onnx.sha256"),
    (lambda d: d["experts"][0]["files"]["onnx"].update(path="../../etc/passwd"), "must be a relative path"),
    (lambda d: d["experts"][0]["files"]["onnx"].update(path="/abs.onnx"), "must be a relative path"),
    (lambda d: d["experts"][0]["files"].update(weights={}), "unknown key\\(s\\) 'weights'"),
    (lambda d: d["router"].update(num_experts=3), "router.num_experts: 3 but 2 experts"),
    (lambda d: d.update(latent=True), "a latent model needs a vae_decoder"),
    (lambda d: d["experts"][1]["files"].update(onnx=d["experts"][0]["files"]["onnx"]), "listed twice"),
    (lambda d: d["scheduler"].update(config=[1]), "scheduler.config: expected an object"),
])
def test_validation_names_the_key(export, edit, match):
    _, m = export
    with pytest.raises(ManifestError, match=match):
        Manifest.from_dict(_broken(m, edit), source="x/manifest.json")


def test_vae_section(export):
    d, m = export
    data = _broken(m, lambda x: x.update(latent=True, family="sd", vae_decoder={
        "files": {"onnx": FileRef.of(d, "router.onnx").__dict__ | {"path": "router.onnx"}}, "scaling_factor": 0.18}))
    with pytest.raises(ManifestError, match="listed twice"):  # a path may not serve two roles
        Manifest.from_dict(data)
    (d / "vae.onnx").write_bytes(b"v")
    data["vae_decoder"]["files"]["onnx"] = FileRef.of(d, "vae.onnx").__dict__
    back = Manifest.from_dict(data)
    assert back.vae_decoder == VaeDecoderInfo({"onnx": FileRef.of(d, "vae.onnx")}, 0.18)


def test_verify_reports_first_bad_file(export):
    d, m = export
    (d / "experts" / "expert_01.onnx").write_bytes(b"\x09" * 104)  # same size, other content
    with pytest.raises(IntegrityError, match=r"expert_01\.onnx: sha256"):
        verify_files(d, m)
    (d / "experts" / "expert_01.onnx").write_bytes(b"\x01" * 300)
    with pytest.raises(IntegrityError, match=r"expert_01\.onnx: larger than recorded: 300 bytes"):
        verify_files(d, m)


def _sd3(d, m) -> dict:
    """The export fixture made an SD3 export: three tokenizers with their lengths, pooled text_embeds, a VAE
    with SD3's shift, a flow sampler with mu."""
    for name in ("vae.onnx", "tokenizer_2/tokenizer.json", "tokenizer_3/tokenizer.json"):
        (d / name).parent.mkdir(parents=True, exist_ok=True)
        (d / name).write_bytes(name.encode())

    def edit(x):
        x.update(latent=True, family="sd3", text_len=333, scheduler={"name": "flow_euler", "config": {"shift": 3.0},
                                                                       "mu": 0.8125},
                 vae_decoder={"files": {"onnx": FileRef.of(d, "vae.onnx").__dict__}, "scaling_factor": 1.5305,
                              "shift_factor": 0.0609})
        x["text_encoder"]["pooled_dim"] = 2048
        x["tokenizer"] = {"files": {k: FileRef.of(d, p).__dict__ for k, p in (
            ("json", "tokenizer/tokenizer.json"), ("json_2", "tokenizer_2/tokenizer.json"),
            ("json_3", "tokenizer_3/tokenizer.json"))}, "lengths": {"json": 77, "json_2": 77, "json_3": 256}}
    return _broken(m, edit)


def test_sd3_keys_round_trip_and_are_checked(export):
    """SD3's keys (scheduler.mu, vae_decoder.shift_factor, tokenizer.json_3 / lengths) read back as written; an
    export of another family is written without them; they are refused where they do not belong."""
    d, m = export
    back = Manifest.from_dict(_sd3(d, m))
    assert back.scheduler.mu == 0.8125 and back.vae_decoder.shift_factor == 0.0609
    assert back.tokenizer.lengths == {"json": 77, "json_2": 77, "json_3": 256}
    assert Manifest.from_dict(back.to_dict()) == back
    plain = m.to_dict()  # the toy export: none of the keys, not even as null
    assert "mu" not in plain["scheduler"] and "lengths" not in plain["tokenizer"]
    no_t5 = _sd3(d, m)  # without T5 the context's last 256 rows are the graph's zeros
    no_t5["tokenizer"]["files"].pop("json_3")
    no_t5["tokenizer"]["lengths"].pop("json_3")
    assert Manifest.from_dict(no_t5).tokenizer.lengths == {"json": 77, "json_2": 77}
    sd = _sd3(d, m)  # an SD export written by this version: shift 0 is left out, and reads back
    sd.update(family="sd", scheduler={"name": "pndm", "config": {"beta_schedule": "linear"}})
    sd["vae_decoder"]["shift_factor"] = 0.0
    sd["tokenizer"] = m.to_dict()["tokenizer"]
    sd["text_encoder"].pop("pooled_dim")
    back_sd = Manifest.from_dict(sd)
    assert back_sd.vae_decoder.shift_factor == 0.0 and "shift_factor" not in back_sd.to_dict()["vae_decoder"]
    for edit, match in [
        (lambda x: x["tokenizer"]["lengths"].update(json_4=3), "unknown key\\(s\\) 'json_4'"),
        (lambda x: x["tokenizer"]["files"].pop("json_3"), "tokenizer.lengths.json_3: no tokenizer file"),
        (lambda x: (x["tokenizer"]["files"].pop("json_2"), x["tokenizer"].pop("lengths")), "needs json_2"),
        (lambda x: x["text_encoder"].pop("pooled_dim"), "pooled projection"),
        (lambda x: x["scheduler"].update(mu="big"), "scheduler.mu: expected a number"),
        (lambda x: x["tokenizer"].pop("lengths"), "json and json_2 the same length"),
        (lambda x: x["tokenizer"]["lengths"].update(json_2=76), "json and json_2 the same length"),
        (lambda x: x["tokenizer"]["lengths"].pop("json_3"), "json_3 has a length exactly when"),
        (lambda x: x["tokenizer"]["lengths"].update(json_3=255), "77 CLIP \\+ 255 T5 tokens do not make text_len 333"),
        (lambda x: x.update(family="sd"), "tokenizer.files.json_3: belongs to sd3 exports"),
        (lambda x: (x.update(family="sd"), x.update(tokenizer=m.to_dict()["tokenizer"]),
                    x["text_encoder"].pop("pooled_dim")), "scheduler.mu: belongs to sd3 exports"),
        (lambda x: (x.update(family="sd"), x.update(tokenizer=m.to_dict()["tokenizer"]),
                    x["text_encoder"].pop("pooled_dim"), x["scheduler"].pop("mu")),
         "vae_decoder.shift_factor: belongs to sd3 exports"),
    ]:
        data = _sd3(d, m)
        edit(data)
        with pytest.raises(ManifestError, match=match):
            Manifest.from_dict(data)
