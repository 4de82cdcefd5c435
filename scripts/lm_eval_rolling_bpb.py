"""Bits per byte of a text file under lm-evaluation-harness, for an exported lmlab model.

A cross-check of `lmlab eval RUN texts=[FILE]` against the harness everybody uses: the same
file, scored by lm-eval's own `HFLM.loglikelihood_rolling` on the `lmlab export` of the run.
lm-eval pulls in much (and an unpinned torch), so run it from a separate virtualenv:

    python3 -m venv ~/lmeval && ~/lmeval/bin/pip install torch==2.13.0 && \
        ~/lmeval/bin/pip install lm-eval accelerate sentencepiece
    lmlab export runs/smoke/model out=runs/smoke/hf_base
    ~/lmeval/bin/python scripts/lm_eval_rolling_bpb.py runs/smoke/hf_base ../shared/data/wikitext-2/test.txt

It prints lm-eval's bits per byte and token count; `lmlab eval` reports the same two
figures (`bits/byte`, `tokens`) for the file. They agree to ~1e-8 (docs/eval_report.md).
"""

import json
import math
import sys


def main() -> None:
    if len(sys.argv) != 3:
        sys.exit("usage: lm_eval_rolling_bpb.py EXPORTED_MODEL_DIR TEXT_FILE")
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    model_dir, path = sys.argv[1], sys.argv[2]
    text = open(path, encoding="utf-8").read()
    lm = HFLM(pretrained=model_dir, device="cpu", batch_size=16, dtype="float32")
    request = Instance(request_type="loglikelihood_rolling", doc={}, arguments=(text,), idx=0)
    ll = lm.loglikelihood_rolling([request])[0]
    print(json.dumps({"bits_per_byte": -ll / math.log(2) / len(text.encode("utf-8")),
                      "tokens": len(lm.tok_encode(text)), "max_length": lm.max_length}))


if __name__ == "__main__":
    main()
