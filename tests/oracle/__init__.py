"""The differential oracle: the kernel's own netfilter (legacy xtables) judging the same packets."""
