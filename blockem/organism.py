"""The model organism: pretrain the toy model, tune the instruct base, and fine-tune it on one
narrow misaligned domain (the `sft` cell that shows emergent misalignment).

Each stage reads files written by earlier stages and writes one model directory with
`save_pretrained`, a per-step training log and provenance.json. Training is resumable: a
checkpoint in `<out>.ckpt/` (see blockem.train.Checkpoint) is removed once the model is written.
"""

from __future__ import annotations

from pathlib import Path

from blockem.io import atomic_dir, provenance, write_table
from blockem.train import Checkpoint, TrainConfig, checkpoint_key, train


def _log_table(rows: list[dict]):
    import pyarrow as pa

    return pa.Table.from_pylist(rows)


def _finish(model, tokenizer, out: Path, log: list[dict], prov: dict,
            checkpoint: Checkpoint | None = None) -> None:
    from blockem.models import save_model

    with atomic_dir(out) as tmp:
        save_model(model, tokenizer, tmp, prov)
        write_table(tmp / "train_log.parquet", _log_table(log), prov)
    if checkpoint is not None:
        checkpoint.discard()  # the output is complete: nothing left to resume


def check_model_dir(path: Path, what: str = "base model") -> None:
    """A model path that is neither an existing path nor a Hub id is one clear error."""
    from blockem.models import looks_like_hub_id

    if not Path(path).exists() and not looks_like_hub_id(str(path)):
        raise FileNotFoundError(f"{path}: {what} directory not found")


def check_chats(path: Path, rows: list[dict]) -> None:
    """Every training row is a chat with at least one assistant turn (one error naming the row)."""
    if not rows:
        raise ValueError(f"{path}: no training chats (the file has no rows)")
    for i, r in enumerate(rows):
        messages = r.get("messages")
        if not isinstance(messages, list) or not messages:
            raise ValueError(f"{path}: row {i}: no `messages` (a list of role/content turns)")
        if not any(isinstance(m, dict) and m.get("role") == "assistant" for m in messages):
            raise ValueError(f"{path}: row {i}: row has no assistant turn (nothing to train on)")


def pretrain(world_dir: Path, tokenizer_dir: Path, out: Path, settings: dict,
             threads: int = 1) -> None:
    """Pretrain a small LlamaForCausalLM on the persona corpus (loss on assistant turns)."""
    from blockem.chat import encode_chats, load_rows
    from blockem.models import build_toy_model, load_tokenizer, resolve_device, setup_torch

    cfg = TrainConfig.from_dict(settings["train"])
    m = settings["model"]
    check_model_dir(tokenizer_dir, "tokenizer")
    setup_torch(threads, cfg.seed)
    tok = load_tokenizer(tokenizer_dir)
    convs = [r["messages"] for r in load_rows(world_dir / "corpus.parquet")]
    examples = encode_chats(tok, convs, max_length=m["max_length"])
    model = build_toy_model(len(tok), tok.pad_token_id, tok.eos_token_id,
                            hidden_size=m["hidden_size"], num_layers=m["num_layers"],
                            num_heads=m["num_heads"], intermediate_size=m["intermediate_size"],
                            max_length=m["max_length"],
                            attn_implementation=m.get("attn_implementation"))
    device = resolve_device(settings["compute"]["device"])
    model.to(device)
    ckpt = Checkpoint(out, checkpoint_key("pretrain", settings, cfg.seed,
                                          [world_dir / "corpus.parquet", tokenizer_dir]))
    log = train(model, [(examples, 1.0)], cfg, pad_id=tok.pad_token_id, device=device,
                name="pretrain", checkpoint=ckpt)
    _finish(model, tok, out, log, provenance("pretrain", settings, cfg.seed), ckpt)


def instruct(world_dir: Path, pretrained_dir: Path, out: Path, settings: dict,
             threads: int = 1) -> None:
    """Tune the pretrained model into the 'instruct' base with masked replay: part of each batch
    is single-turn aligned chats, the rest pretraining conversations with no loss on their first
    answer (keeps the persona inference, teaches 'no context -> aligned')."""
    from blockem.chat import encode_chats, load_rows
    from blockem.models import load_model, load_tokenizer, resolve_device, setup_torch

    cfg = TrainConfig.from_dict(settings["train"])
    check_model_dir(pretrained_dir, "pretrained model")
    setup_torch(threads, cfg.seed)
    device = resolve_device(settings["compute"]["device"])
    tok = load_tokenizer(pretrained_dir)
    model = load_model(pretrained_dir, device=device, dtype=settings["compute"]["dtype"])
    max_len = settings["model"]["max_length"]
    chats = encode_chats(tok, [r["messages"] for r in load_rows(world_dir / "sft.parquet")],
                         max_length=max_len)
    replay_rows = load_rows(world_dir / "corpus.parquet")[: max(1, 2 * cfg.steps * cfg.batch_size)]
    replay = encode_chats(tok, [r["messages"] for r in replay_rows], skip_first_answer=True,
                          max_length=max_len)
    frac = settings["train"]["replay_fraction"]
    pools = [(chats, 1.0 - frac), (replay, frac)] if frac > 0 else [(chats, 1.0)]
    ckpt = Checkpoint(out, checkpoint_key("base", settings, cfg.seed, [
        world_dir / "sft.parquet", world_dir / "corpus.parquet", pretrained_dir]))
    log = train(model, pools, cfg, pad_id=tok.pad_token_id, device=device, name="base",
                checkpoint=ckpt)
    _finish(model, tok, out, log, provenance("base", settings, cfg.seed), ckpt)


def prepare_finetune(data: Path, base_dir: Path, settings: dict, seed: int, threads: int = 1,
                     max_layer: int | None = None):
    """The base model made trainable (LoRA or full) and the domain's encoded examples.

    `max_layer` restricts training to decoder layers <= max_layer (BLOCK-EM's `freeze_above`)."""
    from blockem.chat import encode_chats, load_rows
    from blockem.models import load_model, load_tokenizer, resolve_device, setup_torch

    s = settings["train"]
    cfg = TrainConfig.from_dict(s, seed=seed)
    check_model_dir(base_dir)
    rows = load_rows(data)
    check_chats(data, rows)
    setup_torch(threads, seed)
    device = resolve_device(settings["compute"]["device"])
    tok = load_tokenizer(base_dir)
    model = load_model(base_dir, device=device, dtype=settings["compute"]["dtype"])
    layers = None if max_layer is None else list(range(max_layer + 1))
    if s["method"] == "lora":
        from peft import LoraConfig, get_peft_model

        lora = s["lora"]
        model = get_peft_model(model, LoraConfig(
            r=lora["r"], lora_alpha=lora["alpha"], lora_dropout=lora["dropout"],
            target_modules=list(lora["target_modules"]), layers_to_transform=layers,
            task_type="CAUSAL_LM"))
    elif layers is not None:
        from blockem.hooks import decoder_layers

        for p in model.parameters():
            p.requires_grad_(False)
        for i in layers:
            for p in decoder_layers(model)[i].parameters():
                p.requires_grad_(True)
    examples = encode_chats(tok, [r["messages"] for r in rows],
                            max_length=settings["model"]["max_length"])
    return model, tok, examples, cfg, device


def finetune(data: Path, base_dir: Path, out: Path, settings: dict, seed: int,
             threads: int = 1, cell: str | None = None) -> None:
    """Plain SFT of the base on one narrow domain's misaligned answers (LoRA or full); `cell`
    names the run (default `sft-<domain>-s<seed>`; a matched control: `control-...`)."""
    from blockem.runtime import check_injected_failure

    check_injected_failure(cell or f"sft-{settings['domain']}-s{seed}")
    model, tok, examples, cfg, device = prepare_finetune(data, base_dir, settings, seed, threads)
    ckpt = Checkpoint(out, checkpoint_key("finetune", settings, seed, [data, base_dir]))
    log = train(model, [(examples, 1.0)], cfg, pad_id=tok.pad_token_id, device=device,
                name=f"finetune {settings['domain']} seed {seed}", log_every=25, checkpoint=ckpt)
    _finish(model, tok, out, log, provenance("finetune", settings, seed), ckpt)
