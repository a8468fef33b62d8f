"""Acceptance on the shipped toy teacher (slow): export the teacher and a materialised expert with the real
MiniLM text encoder and router encoder, then compare `Runtime.generate` with the torch sampling path of
training/sampling.py (diffusers DDIM, same seed and numpy noise): PSNR >= 40 dB in fp32."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread"), pytest.mark.filterwarnings("ignore")]

PROMPTS = ["a red circle on a blue background", "the letter K in green above a small yellow square",
           "two small blue squares", "the digit 7 in white"]




@pytest.fixture(scope="module")
def toy_export(tmp_path_factory):
    from aptp_export import ArchSpace
    from aptp_export.export_options import ExportOptions
    from aptp_export.export_parts import ExpertModel, ExportParts
    from aptp_export.manifest_writer import write_export_dir
    from training.text import SentenceEncoder
    from training.toy import load_teacher, teacher_dir

    unet, scheduler, text = load_teacher(scheduler="ddim")
    space = ArchSpace.from_unet(unet)
    arch = space.sample(generator=torch.Generator().manual_seed(0), keep=0.7)
    expert = space.materialize(unet, arch).eval()
    sentence = SentenceEncoder()
    head = torch.nn.Linear(sentence.dim, 2, bias=False)
    with torch.no_grad():
        head.weight.copy_(sentence.encode(PROMPTS[:2]))
    dense_macs = space.dense_macs(height=32, width=32, text_len=16)
    out = tmp_path_factory.mktemp("toy_export")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        parts = ExportParts(
            text_encoder=text.model, router_encoder=sentence.model, router_head=head, tokenizer=sentence.model_dir,
            scheduler_config=dict(scheduler.config), sample_size=(32, 32), in_channels=3,
            text_len=16, context_dim=384, router_max_length=int(sentence.max_seq_length),
            embedding_dim=sentence.dim, dense_macs=dense_macs, budget=0.7, base_model=str(teacher_dir()))
        manifest, report = write_export_dir(
            out, [ExpertModel(unet, dense_macs, share=0.5),
                  ExpertModel(expert, space.macs(arch, height=32, width=32, text_len=16), share=0.5)],
            parts, ExportOptions(scheduler="ddim", progress=False))
    return out, [unet, expert], text, scheduler, report


def test_runtime_matches_torch_sampling_path(toy_export):
    from engines import Runtime
    from training.sampling import sample

    out, unets, text, scheduler, report = toy_export
    print("export report:", {k: (v["seconds"], v["max_rel_error"]) for k, v in report["graphs"].items()})
    rt = Runtime.load(out)
    res = rt.generate_with_info(PROMPTS, steps=25, guidance_scale=7.5, seed=0, batch_size=3)
    assert res.expert_ids[:2] == [0, 1]
    values = []
    for i, prompt in enumerate(PROMPTS):
        ref = sample(unets[res.expert_ids[i]], [prompt], text_encoder=text, scheduler=scheduler, steps=25,
                     guidance_scale=7.5, seed=i)[0]
        mine = np.asarray(res.images[i])
        mse = float(np.mean((mine.astype(np.float64) - ref.astype(np.float64)) ** 2)) / 255.0**2
        values.append(float("inf") if mse == 0 else 10 * np.log10(1 / mse))
    print("toy teacher/expert runtime vs torch PSNR (dB):", [round(float(v), 1) for v in values], "experts",
          res.expert_ids)
    assert min(values) >= 40
