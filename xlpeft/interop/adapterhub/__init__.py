"""AdapterHub (``adapters`` 1.x) adapters <-> xlpeft modules.

An AdapterHub adapter directory holds ``adapter_config.json`` (``{"config": {...BnConfig...},
"name", "model_type", "hidden_size", "version", ...}``), the weights as ``pytorch_adapter.bin``
(or ``adapter.safetensors``), and optionally ``head_config.json`` + ``pytorch_model_head.bin``.

What maps, checked against ``adapters`` 1.3.0 (``methods/modeling.py``: ``Adapter``,
``NICECouplingBlock``; ``configuration/adapter_config.py``):

* ``seq_bn`` (Pfeiffer): after the FFN only, ``original_ln_before`` and ``residual_before_ln``:
  ``h <- h + A(LN(h + x))`` then ``LN(h + x)``: xlpeft's ``pfeiffer`` placement.
* ``double_seq_bn`` (Houlsby): after attention and FFN, ``original_ln_before=False``:
  ``h <- h + A(h)`` then ``LN(h + x)``: xlpeft's ``houlsby`` placement.
* ``*_inv``: a NICE coupling block, ``y1 = x1 + F(x2); y2 = x2 + G(y1)``, F and G two-layer MLPs
  of width ``int((H/2) // inv_adapter_reduction_factor)`` with the adapter's non-linearity: xlpeft's
  :class:`~xlpeft.methods.invertible.InvertibleAdapter`. Weights ``F.0``/``F.2`` are ``F.down``/``F.up``.
* exact extras: a constant ``scaling`` is folded into the up-projection (and unfolded on export),
  ``leave_out`` layers get zero weights (the identity), ``dropout``/``stochastic_depth``/``init_*``
  only act in training.

Heads: a flexible head (``heads.NAME.*``) becomes the task module's head (tagging, or a 2-layer tanh
classification head). A static-head model's own head (``BertForMaskedLM`` + ``adapters.init`` then
``save_adapter`` writes ``cls.predictions.*`` with ``"config": null``) is skipped with a warning when it
equals the base's frozen head, and refused otherwise with a pointer to ``--without-head``.

The other methods (issue 18), each onto the xlpeft method computing the same function
(:func:`~xlpeft.interop.adapterhub.config.resolve_config` decides which):

* ``lora`` (``LoRAConfig``, ``composition_mode="add"``) -> ``lora``; ``ia3`` (``IA3Config``,
  ``composition_mode="scale"``) on keys/values -> ``ia3`` (:mod:`.lowrank`);
* ``prefix_tuning`` (MLP or flat, also ejected) -> ``prefix``, the MLP run once (:mod:`.prefix`);
* ``compacter`` / ``compacter++`` (``phm_layer``) -> ``compacter``; ``par_bn`` (``is_parallel``) ->
  ``parallel``; ``mam`` (the union of both) -> ``mam`` (:mod:`.variants`).

Refused by name: other methods (prompt tuning, ReFT, VeRA, unions other than MAM), AdapterHub's
DoRA and its (IA)³ FFN scaling (both compute other functions than xlpeft's, see :mod:`.lowrank`),
gated adapters, new layer norms (``ln_before``/``ln_after``), ``residual_before_ln`` other than as
in the presets, GLOW invertible blocks, non-linearities xlpeft lacks (e.g. ``gelu_new``), prefixes
with ``leave_out``, shared PHM fast weights.

The invertible adapter sits where AdapterHub and MAD-X put it, on the output of the whole
embedding layer, with its inverse before the MLM decoder, so imported modules give AdapterHub's
logits exactly (tests/interop/fixtures/README.md records the agreement).

``config`` maps BnConfig dicts onto :class:`~xlpeft.methods.adapters.AdapterConfig` and tells the
methods apart, ``reading`` imports a directory, ``writing`` exports one.
"""

from xlpeft.interop.adapterhub.config import PRESETS, adapter_config_from, resolve_bn_config, resolve_config
from xlpeft.interop.adapterhub.reading import import_adapterhub
from xlpeft.interop.adapterhub.writing import export_adapterhub

__all__ = ["PRESETS", "adapter_config_from", "export_adapterhub", "import_adapterhub", "resolve_bn_config",
           "resolve_config"]
