import pytest
from hypothesis import given, strategies as st

from fedpref.protocol.partition import Group, group_of, names_in

CASES = {
    "base_model.model.encoder.encoder.layer.5.attention.self.query.lora_A.shared.weight": Group.SHARED,
    "base_model.model.encoder.encoder.layer.5.attention.self.value.lora_B.private.weight": Group.PRIVATE,
    "base_model.model.score.modules_to_save.shared.weight": Group.SHARED,
    "base_model.model.personal_head.modules_to_save.private.bias": Group.PRIVATE,
    "base_model.model.score.original_module.weight": Group.BACKBONE,
    "base_model.model.encoder.encoder.layer.5.attention.self.query.base_layer.weight": Group.BACKBONE,
    "base_model.model.encoder.embeddings.word_embeddings.weight": Group.BACKBONE,
    "base_model.model.safety_module.classifier.weight": Group.SAFETY,
    # a LoRA on the safety module is still safety: it must never be trained or sent
    "base_model.model.safety_module.proj.lora_A.shared.weight": Group.SAFETY,
}


@pytest.mark.parametrize("name,group", sorted(CASES.items()))
def test_known_names(name, group):
    assert group_of(name) is group


def test_unknown_adapter_is_an_error_not_backbone():
    with pytest.raises(ValueError, match="adapter 'other'"):
        group_of("base_model.model.x.lora_A.other.weight")


def test_names_in_keeps_order():
    names = list(CASES)
    shared = names_in(names, Group.SHARED)
    assert shared == [n for n in names if CASES[n] is Group.SHARED]


@given(st.lists(st.sampled_from(sorted(CASES)), min_size=1))
def test_every_name_in_exactly_one_group(names):
    groups = [set(names_in(names, g)) for g in Group]
    assert sum(len(g) for g in groups) == len(set(names)) or len(names) != len(set(names))
    for a in range(len(groups)):
        for b in range(a + 1, len(groups)):
            assert not groups[a] & groups[b]
