"""A reward function for the RL tests (`rollout.reward=tests/rl_reward.py:digits`): the fraction of
a reply's characters that are digits, so even an untrained policy's replies score differently."""


def digits(prompts, replies, answers):
    return [sum(c.isdigit() for c in r) / max(len(r), 1) for r in replies]
