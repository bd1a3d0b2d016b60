"""What both training stages share, one concept per module:

- ``options``: argument groups, YAML config files, model-config override fields, ``--dataset`` specs;
- ``checkpointing``: crash-safe, pickle-free, resumable checkpoints (save, load, verify, resume, RNG state);
- ``atomic_io``: the one all-or-nothing writer of files, JSON and folders;
- ``loop``: the resumable data order, the non-finite-loss stop, SIGTERM, validation, the distributed teardown;
- ``reporting``: loss curves, markdown tables, the model-card templates.

The names below are re-exported here, so ``from modeling_actprior.training import save_checkpoint`` keeps working.
"""

from .atomic_io import (
    atomic_folder,
    discard_folder,
    exchange_paths,
    fsync_dir,
    fsync_path,
    fsync_tree,
    write_json,
    write_text,
)
from .checkpointing import (
    CHECKPOINT_DIR,
    CHECKSUMS,
    GRAD_SCALER_STATE,
    LR_SCHEDULER_STATE,
    MODEL_WEIGHTS,
    OPTIMIZER_STATE,
    RESUME_HARMLESS_OPTIONS,
    RNG_STATE,
    TRAINER_STATE,
    check_resume_options,
    list_checkpoints,
    load_checkpoint,
    load_trainer_state,
    resolve_resume,
    save_checkpoint,
    start_or_resume,
    verify_checkpoint,
)
from .loop import (
    NonFiniteLossError,
    PreemptionGuard,
    check_chunk_fits,
    check_finite_loss,
    check_output_dir_writable,
    close_distributed,
    endless_batches,
    fixed_val_batches,
    ranks_agree,
    to_device,
    validation_loss,
)
from .options import (
    add_config_field_arguments,
    add_training_arguments,
    config_field_names,
    jsonable,
    parse_dataset_specs,
    parse_with_yaml,
    str2bool,
)
from .reporting import markdown_table, model_card_template, plot_curves

__all__ = [
    "CHECKPOINT_DIR", "CHECKSUMS", "GRAD_SCALER_STATE", "LR_SCHEDULER_STATE", "MODEL_WEIGHTS", "OPTIMIZER_STATE",
    "RESUME_HARMLESS_OPTIONS", "RNG_STATE", "TRAINER_STATE", "NonFiniteLossError", "PreemptionGuard",
    "add_config_field_arguments", "add_training_arguments", "atomic_folder", "check_chunk_fits", "check_finite_loss",
    "check_output_dir_writable", "check_resume_options", "close_distributed", "config_field_names", "discard_folder", "endless_batches",
    "exchange_paths", "fixed_val_batches", "fsync_dir", "fsync_path", "fsync_tree", "jsonable", "list_checkpoints",
    "load_checkpoint", "load_trainer_state", "markdown_table", "model_card_template", "parse_dataset_specs",
    "parse_with_yaml", "plot_curves", "ranks_agree", "resolve_resume", "save_checkpoint", "start_or_resume",
    "str2bool", "to_device", "validation_loss", "verify_checkpoint", "write_json", "write_text",
]
