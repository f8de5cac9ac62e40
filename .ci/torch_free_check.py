"""Run by .ci/fresh_venv_smoke inside the torch-free venv, from outside the checkout: every jaxswift module imports
(the server's and the web UI's too: the venv has both extras), a model saved as an HF folder reloads through api.load_model with
the same tokenizer (transformers' AutoTokenizer on a folder), and torch was never imported."""

import importlib
import pkgutil
import sys
import tempfile

import jaxswift
from jaxswift.api import load_model, save_model

modules = [m.name for m in pkgutil.walk_packages(jaxswift.__path__, "jaxswift.")]
for name in modules:
    importlib.import_module(name)

model = load_model("smollm2-135m-instruct")
chat = [{"role": "user", "content": "Hi"}]
with tempfile.TemporaryDirectory() as folder:
    save_model(model, folder)
    again = load_model(folder)
    assert again.tokenizer.encode("Hi there!") == model.tokenizer.encode("Hi there!")
    assert again.tokenizer.apply_chat_template(chat, tokenize=False) == \
        model.tokenizer.apply_chat_template(chat, tokenize=False)
assert "torch" not in sys.modules, "torch was imported"
print(f"torch-free: {len(modules)} modules imported from {jaxswift.__file__}; a saved HF folder reloads with the "
      "same tokenizer")
