"""A randomly initialised Llama-style model (built in code, no download) run with transformers' SDPA attention
and with flashgen's (`attn_implementation="fgen"`) from the same weights: logits compared, forward and
training-step time measured.

    python benchmarks/transformers_e2e.py --json out.json          # GPU, bf16

Prints the relative error of flashgen's logits against SDPA's, next to the same error of transformers'
eager attention (the bf16 noise floor), and the median times of a forward and of a forward+backward step.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from flashgen.integrations import transformers as fg  # noqa: E402
from flashgen.reference import relative_error  # noqa: E402
from flashgen.timing import median_ms  # noqa: E402


def main(argv: list[str] | None = None) -> dict:
    from transformers import LlamaConfig, LlamaForCausalLM

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--kv-heads", type=int, default=4)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seqlen", type=int, default=2048)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)

    fg.register()
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=32000, hidden_size=args.hidden, intermediate_size=4 * args.hidden,
                         num_hidden_layers=args.layers, num_attention_heads=args.heads,
                         num_key_value_heads=args.kv_heads, max_position_embeddings=args.seqlen)  # fmt: skip
    base = LlamaForCausalLM(config).to(device="cuda", dtype=torch.bfloat16)
    models = {}
    for name in ("sdpa", "eager", fg.NAME):
        model = copy.deepcopy(base)
        model.set_attn_implementation(name)
        models[name] = model
    ids = torch.randint(0, config.vocab_size, (args.batch, args.seqlen), device="cuda")
    with torch.no_grad():
        logits = {name: model(ids).logits.float() for name, model in models.items()}
    result = {
        "device": torch.cuda.get_device_name(), "config": vars(args) | {"json": None},
        "error_vs_sdpa": {name: relative_error(logits[name], logits["sdpa"]) for name in ("eager", fg.NAME)},
        "forward_ms": {}, "train_step_ms": {},
    }  # fmt: skip
    del logits
    for name in ("sdpa", fg.NAME):
        model = models[name]
        with torch.no_grad():
            result["forward_ms"][name] = median_ms(lambda: model(ids).logits, rep_ms=300)

        def step() -> None:
            model.zero_grad(set_to_none=True)
            model(ids, labels=ids).loss.backward()

        result["train_step_ms"][name] = median_ms(step, rep_ms=300)
    err = result["error_vs_sdpa"]
    print(f"{result['device']}, bf16, Llama {args.layers} layers hidden {args.hidden} heads {args.heads}/{args.kv_heads}, "
          f"batch {args.batch} x {args.seqlen} tokens\n"
          f"logits relative error vs SDPA: flashgen {err[fg.NAME]:.2e}, eager (noise floor) {err['eager']:.2e}\n"
          f"forward ms: sdpa {result['forward_ms']['sdpa']:.2f}, flashgen {result['forward_ms'][fg.NAME]:.2f}; "
          f"train step ms: sdpa {result['train_step_ms']['sdpa']:.2f}, flashgen {result['train_step_ms'][fg.NAME]:.2f}")  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
