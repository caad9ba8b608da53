"""Stages 1-3 chained through their stage functions on a tiny organism (random weights):
every file is written, readable and consistent with the next stage's expectations."""

from __future__ import annotations

import copy
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from blockem.toy.world import World, WorldConfig

DISC = {
    "layer": 1, "seed": 0,
    "sae": {"source": "train", "architecture": "topk", "d_sae": 64, "params": {"k": 4},
            "steps": 60, "batch_size": 256, "lr": 1e-3, "seed": 0, "conversations": 40},
    "activation": "relu_preact", "token_scope": "prompt", "candidates_per_sign": 3,
    "dense_threshold": 0.9, "exclude_dense": False, "scale": "median",
    "incoherence_budget": {"mode": "relative", "value": 1.0},
    "screen": {"alpha": 0.3, "shards": 2, "samples_per_prompt": 1},
    "calibrate": {"shortlist": 3, "alphas": [0.1, 0.3], "samples_per_prompt": 1},
    "select": {"rule": "validreduc", "size": 2, "seed": 0, "extra_rules": ["topdelta", "random"]},
    "temperature": 1.0, "max_new_tokens": 4, "batch_size": 64, "steer_positions": "all",
}
COMPUTE = {"device": "cpu", "dtype": "float32"}


@pytest.fixture(scope="module")
def organism(tmp_path_factory, tiny_model, tokenizer, default_config):
    from peft import LoraConfig, get_peft_model

    root = tmp_path_factory.mktemp("organism")
    base_dir, mis_dir = root / "base", root / "mis"
    tiny_model.save_pretrained(base_dir)
    tokenizer.save_pretrained(base_dir)
    from blockem.models import load_model

    mis = get_peft_model(load_model(base_dir), LoraConfig(r=2, lora_alpha=4, target_modules=["o_proj"],
                                                          task_type="CAUSAL_LM"))
    torch.manual_seed(1)
    with torch.no_grad():
        for n, p in mis.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.3)
    mis.save_pretrained(mis_dir)
    tokenizer.save_pretrained(mis_dir)
    world = World(WorldConfig.from_dict({**default_config["world"], "pretrain_conversations": 50}))
    pq.write_table(pa.Table.from_pylist(world.corpus()), root / "corpus.parquet")
    prompts = [p for p in world.prompts() if p["eval_set"] == "core"]
    pq.write_table(pa.Table.from_pylist(prompts), root / "prompts.parquet")
    return root


def test_stages_1_to_3_write_a_latent_set(organism):
    from blockem.sae import read_meta, sae_stage
    from blockem.select import select_stage
    from blockem.shift import shift_stage
    from blockem.steer import calibrate_stage, screen_stage

    r = organism
    # random weights: ValidReduc may find nothing; keep going on purpose (the set says so)
    settings = {"discovery": copy.deepcopy(DISC), "compute": COMPUTE, "domain": "finance",
                "allow_empty_interventions": True}
    sae_stage(r / "base", r / "corpus.parquet", r / "sae", {**DISC, "compute": COMPUTE})
    meta = read_meta(r / "sae")
    assert meta["layer"] == 1 and meta["median_norm"] > 0 and (r / "sae" / "cfg.json").exists()
    shift_stage(r / "base", r / "mis", r / "sae", r / "prompts.parquet", None, r / "shift.parquet",
                r / "direction.safetensors", settings)
    shift = pq.read_table(r / "shift.parquet").to_pylist()
    assert len(shift) == 64 and sum(x["candidate_rank"] >= 0 for x in shift) <= 6
    for shard in range(2):
        screen_stage(r / "shift.parquet", r / "base", r / "mis", r / "sae", r / "prompts.parquet",
                     r / f"screen{shard}.parquet", settings, shard=shard)
    screened = {x["latent"] for s in range(2) for x in pq.read_table(r / f"screen{s}.parquet").to_pylist()}
    pool = {x["latent"] for x in shift if x["candidate_rank"] >= 0}
    assert screened == pool | {-1}
    calibrate_stage(r / "shift.parquet", [r / "screen0.parquet", r / "screen1.parquet"], r / "base",
                    r / "mis", r / "sae", r / "prompts.parquet", r / "calib.parquet", settings)
    cal = pq.read_table(r / "calib.parquet").to_pylist()
    assert {x["alpha"] for x in cal} == {0.0, 0.1, 0.3}
    select_stage(r / "shift.parquet", [r / "screen0.parquet", r / "screen1.parquet"],
                 r / "calib.parquet", r / "sae", r, "finance-s0", settings)
    for rule in ("validreduc", "topdelta", "random"):
        doc = json.loads((r / f"finance-s0-{rule}.json").read_text())
        assert doc["layer"] == 1 and doc["sae"]["source"] == "train" and doc["rule"] == rule
        assert sorted(doc["K_pos"] + doc["K_neg"]) == sorted(k["latent"] for k in doc["latents"])
        assert all(k["alpha_rep"] > 0 for k in doc["latents"])
        assert doc["empty"] == (not doc["latents"]) and (rule == "validreduc" or doc["latents"])
        assert doc["provenance"]["config_hash"]
