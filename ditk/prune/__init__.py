"""`ditk prune`: make a trained model smaller and write it as an ordinary run.

One file per job: `layout` (which blocks a backbone may lose and how its config shrinks), `gates` (block
bypass / gating through `ditk.hooks`), `surgery` (kept blocks -> new config section + renamed weights),
`calib` (calibration batches and the diffusion loss), `score` (Block Influence, oracle loss increase, index,
random), `learnable` (TinyFusion's Gumbel N:M search with LoRA), `experts` (DiT-MoE expert pruning), `width`
(Taylor MLP-channel pruning), `heads` (Taylor attention-head pruning), `recover` (fine-tuning the pruned model), `run` (the command's steps).
"""
