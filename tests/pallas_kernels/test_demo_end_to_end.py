"""A demo VAR and a demo DiT sampled in packed W4A16 and W8A8 through the Pallas kernels (interpreter) and through
the ``xla`` backend: the VAR token maps are identical, the DiT samples agree within float tolerance."""

import jax
import numpy as np
import pytest

from bitlaws.demo import family
from bitlaws.quant import transform
from bitlaws.sample.var_sampler import autoregressive_infer_cfg
from bitlaws.sweep import settings

LABELS = np.arange(10, dtype=np.int32)  # one sample per digit


def _packed(member, setting, backend):
    rules = settings.quant_rules(setting, "int", member.quant_pattern)
    return transform.apply_method(member.model, rules, "rtn", materialize="packed", backend=backend)


@pytest.mark.parametrize("setting", ["W4A16", "W8A8"])
def test_var_token_maps_identical(setting):
    member = family.load_member("var-d1")
    drawn = {}
    for backend in ("xla", "pallas-interpret"):
        model = _packed(member, setting, backend)
        drawn[backend] = autoregressive_infer_cfg(model, member.tokenizer, B=LABELS.size, label_B=LABELS,
                                                  key=jax.random.key(3), cfg=member.cfg, top_k=member.top_k,
                                                  top_p=member.top_p, return_logits=True)
    for scale, (a, b) in enumerate(zip(drawn["xla"].tokens, drawn["pallas-interpret"].tokens)):
        np.testing.assert_array_equal(a, b, err_msg=f"{setting}: token map of scale {scale} differs")
    np.testing.assert_allclose(drawn["xla"].images, drawn["pallas-interpret"].images, atol=1e-5)


@pytest.mark.parametrize("setting", ["W4A16", "W8A8"])
def test_dit_samples_agree(setting):
    member = family.load_member("dit-d2")
    images = {backend: member.sample(_packed(member, setting, backend), LABELS, jax.random.key(3))
              for backend in ("xla", "pallas-interpret")}
    np.testing.assert_allclose(images["pallas-interpret"], images["xla"], atol=2e-3)
