"""The README.md written into every ``leantrain export`` folder: what it holds and the lines that load it."""
from __future__ import annotations

from pathlib import Path

USAGE = {
    ("hf", "classify"): """```python
from transformers import AutoModelForSequenceClassification, AutoTokenizer
model = AutoModelForSequenceClassification.from_pretrained("{out}").eval()
tok = AutoTokenizer.from_pretrained("{out}")
probs = model(**tok(["a text"], truncation=True, padding=True, return_tensors="pt")).logits.softmax(-1)
print(model.config.id2label[int(probs.argmax())])
```
The last encoder layer is not a trained layer: it computes the masked mean pooling leantrain's classifier uses
(transformers' BERT classifier reads the first token instead), with large constants. Run it in float32 and for
inference; to train further, start from the `safetensors` export or from the run.""",
    ("hf", "causal-lm"): """```python
from transformers import AutoModelForCausalLM, AutoTokenizer
model = AutoModelForCausalLM.from_pretrained("{out}").eval()
tok = AutoTokenizer.from_pretrained("{out}")
ids = tok(["and moses said"], add_special_tokens=False, return_tensors="pt")
print(tok.decode(model.generate(**ids, max_new_tokens=20, do_sample=False)[0], skip_special_tokens=True))
```""",
    ("peft", "classify"): """```python
from peft import PeftModel
from transformers import AutoModelForSequenceClassification, AutoTokenizer
base = AutoModelForSequenceClassification.from_pretrained("{out}/base")
model = PeftModel.from_pretrained(base, "{out}").eval()
tok = AutoTokenizer.from_pretrained("{out}/base")
```
`base/` is the `hf` export of the weights the adapter was trained on (with the trained head), not the original
model: a quantized base is dequantized there, PiSSA's base is its residual.""",
    ("peft", "causal-lm"): """```python
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer
base = AutoModelForCausalLM.from_pretrained("{out}/base")
model = PeftModel.from_pretrained(base, "{out}").eval()
tok = AutoTokenizer.from_pretrained("{out}/base")
```
`base/` is the `hf` export of the weights the adapter was trained on (a quantized base is dequantized there).""",
    ("safetensors", "classify"): """```python
import torch
from safetensors.torch import load_file
from leantrain.models import build_classifier
import json
labels = json.load(open("{out}/labels.json"))
model = build_classifier("<the run's --model>", len(labels)).eval()
model.load_state_dict(load_file("{out}/model.safetensors"))  # encoder.* + classifier.*, pooling = mean
```""",
    ("safetensors", "causal-lm"): """```python
from safetensors.torch import load_file
state = load_file("{out}/model.safetensors")  # transformers' key names; see lm.json for a scratch vocabulary
```""",
}


def readme(fmt: str, task: str, out: Path, notes: list[str]) -> str:
    lines = [f"# leantrain export ({fmt}, {task})", "", ("Written by `leantrain export`; export.json holds the same "
             "facts as data."), "", "## How it was made", ""]
    lines += [f"- {n}" for n in notes] or ["- the trained model as it was (nothing to merge)"]
    lines += ["", "## Load it", "", USAGE[(fmt, task)].format(out=out), ""]
    return "\n".join(lines)
