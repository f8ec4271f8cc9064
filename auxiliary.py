"""The parts that methods learn beside the student, as pure functions over the 'aux.' entries
of the parameter dict: trained (or, for CRD's memory, updated) and checkpointed with the
student, never deployed with it. Each method's constructor of its parameters sits next to the
function that applies them."""
import torch
import torch.nn.functional as F

from utils import batch_norm, bnparams, conv_params, linear_params

# ----------------------------------------------------------------------------------------------
# CRD: embeddings and the momentum memory of every training image

# ----------------------------------------------------------------------------------------------
# AB and OFD: connectors from the student's groups to the teacher's

# ----------------------------------------------------------------------------------------------
# FT: the paraphraser of the teacher's last group and the translator of the student's

# ----------------------------------------------------------------------------------------------
# ReviewKD: attention-based fusion (ABF) of the student's groups
