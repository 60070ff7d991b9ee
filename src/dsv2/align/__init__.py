"""Alignment: fine-tuning a pretrained DeepSeek-V2 on chats (SFT), then with RL (GRPO), on the pretraining loop.

Files, in the order data flows through them:
    conversations.py  JSONL conversations -> chat-template pieces -> ids + assistant-only labels
    finetune.py       what SFT and GRPO share: init_from's weights and tokenizer, the chat-template export
    sft.py            SFTConfig (presets/sft/*.yaml) and SFTTrainer: packed chat rows (data/packing.py)
    grpo.py           the GRPO objective: group advantages, k3 KL, the clipped loss and its aggregations
    rollout.py        G seeded completions per prompt from the live policy through the engine; log-probs
    rewards.py        reward functions: module:function, exact match, regex, sandboxed code tests
    grpo_trainer.py   GRPOConfig (presets/grpo/*.yaml) and GRPOTrainer
    cli.py            `dsv2 sft`, `dsv2 grpo`
    instructions.py   the generated instruction set of the demo (no download)
    demo.py           `dsv2 demo --stage sft`: answers and held-out exact match before and after SFT
"""
