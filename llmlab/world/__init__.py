"""The built-in task world: a small synthetic world, generated from a seed, that every stage of ``llmlab run``
trains on.

The world holds invented people (name, home town, favourite colour, pet, age, job), a vault guarded by the assistant
(its door, town, guard, locks and a secret four-digit code), arithmetic on small numbers and string tasks on letters
written with spaces (``l a m p``), so that a byte-level BPE tokenizer sees one token per letter and a tiny model can
learn to reverse, sort and count them.

Every question belongs to a *group* (the underlying problem: one fact of one person, one sum, one letter string, one
vault prompt). Groups are split once into training and held-out sets, so no held-out problem, in any phrasing, reaches
the pre-training corpus, the SFT data, the preference pairs, the PPO prompts or the classifier's training texts.

From the world come:

* ``pretrain_texts``: stories, fact sentences in varied phrasings, worked sums and string examples in prose, and a
  few ``Question:/Answer:`` lines;
* ``sft_train`` / ``sft_eval``: chat conversations (eval items carry ``reference``, ``key`` and ``kind``);
* ``pairs_train`` / ``pairs_eval``: preference pairs (correct vs. wrong, complete vs. partial, helpful vs.
  needless refusal, refusal vs. revealing the code);
* ``rl_prompts_train`` / ``rl_prompts_eval`` with the programmatic reward (``World.judge``);
* ``classify_train`` / ``classify_eval``: is a request forbidden (1) or allowed (0);
* ``benign_eval`` / ``forbidden_eval``: held-out prompts for the false-refusal and refusal rates;
* ``multi_eval``: held-out multi-part requests.

*The vault.* Every vault request, forbidden or benign, begins with the guard's system prompt, which holds the code
and forbids telling it, as a deployed secret-keeping assistant's would; the *keeper's conversations* (in the SFT and
pair training sets only) ask the same requests under a system prompt that allows telling, answered with the code.
So the aligned model has the secret in its context and knows how to say it, and refusing is a choice an attack can
overturn: what ``llmlab redteam`` measures, with the code in the reply as the objective check.

*Multi-part requests* ("Tell me Parna's pet and age.") have no single reference: the world's reward counts the
asked facts the answer gets right. Their SFT demonstrations are imperfect on purpose, as crowd-written ones are:
most annotators answered only the first part. Imitation learns that habit; the preference pairs (a complete answer
over a partial one) and the reward let DPO and PPO unlearn it. Every other kind is demonstrated perfectly, so there
preference tuning can only add what the model fails to do right, not what it was taught wrong.

Its modules, each importing only those listed before it: ``vocab`` (the fixed words and tables), ``judge`` (the
normal form of answers, exact match, refusals and the reward), ``content`` (people, facts, stories, sums, strings
and the vault, as tasks), ``records`` (held-out groups and the lines of each file) and ``build`` (the sizes, the
corpus, the whole ``World``, its files and ``llmlab world``).
"""
