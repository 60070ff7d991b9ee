"""Alignment: fine-tuning a pretrained DeepSeek-V2 on chats (SFT), on the pretraining loop.

Files, in the order data flows through them:
    conversations.py  JSONL conversations -> chat-template pieces -> ids + assistant-only labels
    sft.py            SFTConfig (presets/sft/*.yaml) and SFTTrainer: the pretraining Trainer with
                      init_from weights, packed chat rows (data/packing.py) and held-out answer loss
    cli.py            `dsv2 sft`
    instructions.py   the generated instruction set of the demo (no download)
    demo.py           `dsv2 demo --stage sft`: answers and held-out exact match before and after SFT
"""
