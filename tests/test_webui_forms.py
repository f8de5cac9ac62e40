"""The web UI's form logic without a browser: every field of every recipe's arguments is reachable, default forms
give no flags, and values reach the recipe's parser as the command line would pass them."""

import pytest

from jaxswift.webui import forms
from jaxswift.webui.registry import RECIPES, available_recipes, recipe


@pytest.mark.parametrize("spec", available_recipes(), ids=lambda s: s.key)
def test_default_form_is_an_empty_command_that_parses(spec):
    fields = forms.describe(spec.arguments_class(), spec.choices)
    values = {f.name: f.default_text for f in fields}
    flags = forms.to_flags(fields, values)
    assert flags == []
    forms.parse_flags(spec.arguments_class(), flags)
    missing = set(spec.common) - {f.name for f in fields}
    assert not missing, f"{spec.key}: common fields that its arguments do not have: {missing}"


def test_values_become_flags_the_parser_accepts_and_refuses():
    spec = recipe("sft")
    fields = forms.describe(spec.arguments_class(), spec.choices)
    values = {f.name: f.default_text for f in fields}
    values.update(max_steps="3", packing=False, dataset="builtin:self_identity#8", learning_rate="3e-4",
                  demo_question="")
    flags, args = forms.validate(spec, fields, values)
    assert flags == ["--dataset", "builtin:self_identity#8", "--packing", "false", "--max_steps", "3",
                     "--demo_question", ""]
    assert args.max_steps == 3 and args.packing is False and args.demo_question == ""
    assert "max_steps: 3" in forms.config_yaml(flags, args, fields)
    for bad, message in ((dict(learning_rate="-1e-4"), "learning_rate must be positive"),
                         (dict(learning_rate="abc"), "invalid float"),
                         (dict(dataset="missing/data.jsonl"), "does not exist"),
                         (dict(save_total_limit=""), "save_total_limit"),
                         (dict(tuner_type="qlora"), "tuner_type")):
        with pytest.raises(forms.FormError, match=message):
            forms.validate(spec, fields, {**values, **bad})


def test_every_recipe_has_its_tab():
    assert [s.key for s in available_recipes()] == [s.key for s in RECIPES]
    assert [s.key for s in RECIPES] == ["sft", "rlhf", "grpo", "eval", "export", "plan"]
