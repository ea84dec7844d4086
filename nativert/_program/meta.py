"""Keys nativert reads and writes in `node.meta`, in one place for every layer."""

# Set by partitioners: which region (and so which delegate) runs the node.
TAG_KEY = "delegation_tag"
# Why a node stays in PyTorch (shown by the delegation report, saved in packages).
REASON_KEY = "nativert_not_delegated"
# A node whose meta has this key stays in PyTorch; the value is the reason reported.
PIN_KEY = "nativert_keep_in_pytorch"
# The input kind (parameter, buffer, ...) a partitioner records on placeholders for checkers.
INPUT_KIND_KEY = "nativert_input_kind"
# The signature name a placeholder answers to (graph copies may rename placeholders).
ARG_NAME_KEY = "nativert_signature_name"
# On a call_delegate node: what autotune or the accuracy guard measured for its region, one
# line for the report.
NOTE_KEY = "nativert_note"
# On a segment's node: the op the program had there, when lowering respelled it (a view
# made a reshape); the delegation report counts the program's op.
SOURCE_OP_KEY = "nativert_source_op"
