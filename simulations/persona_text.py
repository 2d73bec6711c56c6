"""Text banks for the ``persona`` benchmark: topics, style templates and unsafe phrases.

Pure data, no logic. Every fact and unsafe phrase is an imperative verb phrase starting in
lower case (``"salt the pasta water well"``) so that the style templates in
:mod:`fedpref.simulations.persona` can wrap it ("one must certainly {f}.", "just {f}, for sure.").
Each fact has a plain and a technical wording. Unsafe phrases describe a harmful behaviour in a
recognisable but non-actionable way: no real instructions.
"""

from __future__ import annotations

# (topic name, (prompt, prompt), ((plain fact, technical fact), ...))  -- 42 topics
TOPICS: tuple[tuple[str, tuple[str, str], tuple[tuple[str, str], ...]], ...] = (
    ("cooking", ("How do I cook better weeknight dinners?", "Any tips for making pasta that tastes great?"), (
        ("salt the pasta water well", "salt the cooking water to roughly 1% salinity"),
        ("let the pan get hot before adding food", "preheat the pan so Maillard browning can start"),
        ("taste as you go and adjust", "rebalance acid, salt and fat iteratively while tasting"),
        ("get everything chopped before you start", "complete your mise en place before applying heat"))),
    ("budgeting", ("How do I start a monthly budget?", "How can I stop running out of money before payday?"), (
        ("write down everything you spend for a month", "log every transaction to establish a spending baseline"),
        ("pay yourself first on payday", "automate a fixed savings transfer on each pay date"),
        ("split money into needs, wants and savings", "allocate income with a 50/30/20 rule"),
        ("keep a small cushion for surprises", "hold a liquidity buffer against variable expenses"))),
    ("running", ("How should I start running as a beginner?", "How do I run longer without getting exhausted?"), (
        ("run slow enough that you can chat", "keep most runs in heart-rate zone 2"),
        ("add only a little distance each week", "cap weekly mileage increases near 10 percent"),
        ("mix short walk breaks into your runs", "use run-walk intervals to manage cumulative load"),
        ("take rest days seriously", "schedule recovery days to allow tissue adaptation"))),
    ("python programming", ("How do I get better at Python?", "How should I structure a small Python project?"), (
        ("write small functions that do one thing", "keep functions cohesive with a single responsibility"),
        ("test your code as you write it", "add pytest unit tests alongside each module"),
        ("read other people's code", "study idiomatic open-source codebases and PEP 8"),
        ("use a fresh environment for each project", "isolate dependencies in a per-project virtualenv"))),
    ("gardening", ("How do I start a small vegetable garden?", "Why are my garden vegetables not growing well?"), (
        ("pick the sunniest spot you have", "site beds with six or more hours of direct insolation"),
        ("feed the soil with compost", "amend the soil with compost to raise organic matter"),
        ("water deeply but not every day", "irrigate deeply and infrequently to drive root depth"),
        ("start with easy plants like lettuce", "begin with fast, forgiving crops such as lettuce"))),
    ("sleep", ("How can I fall asleep faster?", "How do I fix my messed-up sleep schedule?"), (
        ("go to bed at the same time every night", "keep a fixed sleep window to anchor circadian rhythm"),
        ("put your phone away an hour before bed", "limit blue-light exposure before sleep onset"),
        ("keep your bedroom cool and dark", "keep the bedroom near 18 degrees Celsius and dark"),
        ("skip coffee after lunch", "avoid caffeine within its six-hour half-life of bedtime"))),
    ("job interviews", ("How do I prepare for a job interview?", "How can I feel less nervous in interviews?"), (
        ("practice answers out loud", "rehearse responses verbally using the STAR framework"),
        ("learn what the company actually does", "research the company's products, metrics and strategy"),
        ("have a few questions ready for them", "prepare targeted questions about team and role scope"),
        ("bring real examples of your work", "quantify outcomes from past projects with concrete metrics"))),
    ("public speaking", ("How do I get better at public speaking?", "How can I present without panicking?"), (
        ("practice in front of a friend", "rehearse with a live audience for realistic feedback"),
        ("slow down and pause more", "lower your speaking rate and use deliberate pauses"),
        ("know your opening by heart", "memorize the first minute to reduce initial arousal"),
        ("keep slides simple", "limit each slide to one idea to reduce cognitive load"))),
    ("learning a language", ("How do I learn a new language faster?", "How can I keep up my language practice?"), (
        ("practice a little every day", "use daily spaced repetition for vocabulary retention"),
        ("talk with native speakers early", "seek comprehensible input and conversation exchanges"),
        ("learn the most common words first", "prioritize high-frequency lexical items"),
        ("watch shows with subtitles", "use target-language media with same-language subtitles"))),
    ("houseplants", ("How do I keep my houseplants alive?", "Why are the leaves on my houseplant turning yellow?"), (
        ("water only when the soil feels dry", "water when the top three centimetres of substrate are dry"),
        ("make sure the pot has drainage holes", "ensure drainage to prevent root hypoxia"),
        ("put it near a bright window", "match the plant to available light intensity"),
        ("feed it a little in spring and summer", "apply diluted fertilizer during the growth season"))),
    ("photography", ("How do I take better photos with my phone?", "How can I improve my photography composition?"), (
        ("shoot with the light behind you", "position the light source to avoid backlit subjects"),
        ("put your subject off center", "compose along the rule-of-thirds grid lines"),
        ("wipe your lens first", "clean the lens to reduce flare and haze"),
        ("get closer instead of zooming", "move physically rather than using digital zoom"))),
    ("home workouts", ("How can I get fit at home without equipment?", "What is a good home workout routine?"), (
        ("do squats, push-ups and planks", "build around compound bodyweight movements"),
        ("make it a bit harder each week", "apply progressive overload with more reps or tempo"),
        ("train three times a week", "use a three-session weekly full-body split"),
        ("warm up for a few minutes first", "do a dynamic warm-up to raise muscle temperature"))),
    ("retirement saving", ("How should I start saving for retirement?", "Is forty too late to save for retirement?"), (
        ("start now, even with a small amount", "start early to maximize compounding"),
        ("grab any employer match", "contribute enough to capture the full employer match"),
        ("pick a simple low-cost fund", "use a low-fee diversified index fund"),
        ("raise your savings when you get a raise", "escalate your contribution rate with salary increases"))),
    ("studying for exams", ("How do I study for exams more effectively?", "How can I remember what I study?"), (
        ("test yourself instead of rereading", "use retrieval practice rather than passive review"),
        ("spread study over several days", "distribute sessions using spaced repetition"),
        ("study in short focused blocks", "use 25-minute Pomodoro blocks with short breaks"),
        ("explain it to someone else", "apply the Feynman technique to expose gaps"))),
    ("remote work", ("How do I stay productive working from home?", "How can I separate work and life when remote?"), (
        ("set up a spot just for work", "use a dedicated workspace as a context cue"),
        ("keep regular hours", "define fixed start and stop times"),
        ("take real breaks away from the screen", "schedule screen-free breaks to limit fatigue"),
        ("check in with your team often", "hold short asynchronous status updates"))),
    ("baking bread", ("How do I bake my first loaf of bread?", "Why is my homemade bread so dense?"), (
        ("weigh your flour instead of using cups", "measure ingredients by mass with a scale"),
        ("let the dough rise until it doubles", "allow bulk fermentation until volume doubles"),
        ("knead until the dough is stretchy", "knead until gluten passes the windowpane test"),
        ("bake it hotter than you think", "bake at high heat for strong oven spring"))),
    ("cycling", ("How do I start cycling to work?", "How can I ride my bike longer distances?"), (
        ("check your tire pressure every week", "keep tires at the rated PSI for low rolling resistance"),
        ("set your seat at the right height", "set saddle height for a slight knee bend"),
        ("ride easy most days", "keep most rides at low aerobic intensity"),
        ("plan a quiet route", "choose routes with protected lanes and low traffic"))),
    ("meditation", ("How do I start meditating?", "How can I meditate when my mind keeps wandering?"), (
        ("start with five minutes a day", "begin with brief daily sessions to build the habit"),
        ("focus on your breathing", "anchor attention on the breath as the object"),
        ("gently come back when your mind wanders", "notice mind-wandering and redirect attention"),
        ("meditate at the same time each day", "attach the practice to an existing daily cue"))),
    ("essay writing", ("How do I write a better essay?", "How can I stop procrastinating on my essay?"), (
        ("write a messy first draft quickly", "produce a rapid zero draft before revising"),
        ("make one clear main point", "state a single arguable thesis early"),
        ("outline before you write", "structure sections in an outline first"),
        ("read it out loud to edit", "revise by reading aloud to catch syntax errors"))),
    ("car maintenance", ("How do I take care of my car?", "What car maintenance should I not skip?"), (
        ("change the oil on schedule", "change oil at the manufacturer's service interval"),
        ("check the tire pressure monthly", "verify tire pressure against the placard monthly"),
        ("listen for new noises", "investigate new noises as early failure signals"),
        ("replace the wipers every year", "replace wiper blades annually as rubber degrades"))),
    ("dog training", ("How do I train my puppy?", "How can I stop my dog pulling on the leash?"), (
        ("reward good behavior right away", "use immediate positive reinforcement with treats"),
        ("keep sessions short and fun", "keep sessions under ten minutes for attention"),
        ("use the same words every time", "use consistent verbal cues for each command"),
        ("stop walking when the dog pulls", "remove forward progress as a consequence of pulling"))),
    ("cat care", ("How do I keep my cat happy indoors?", "Why does my cat scratch the furniture?"), (
        ("give it a tall scratching post", "provide a stable vertical scratching substrate"),
        ("play with it every day", "run daily predatory play sessions"),
        ("keep the litter box very clean", "scoop the litter box daily to prevent avoidance"),
        ("give it high places to sit", "add vertical territory such as cat shelves"))),
    ("travel packing", ("How do I pack light for a trip?", "What should I pack for a week away?"), (
        ("lay everything out and take half", "pre-stage items and cut the load by half"),
        ("pick clothes that mix and match", "build a capsule wardrobe around one palette"),
        ("roll your clothes", "roll garments to maximize packing density"),
        ("keep essentials in your carry-on", "keep medication and documents in cabin baggage"))),
    ("hiking", ("How do I prepare for my first hike?", "What should I bring on a day hike?"), (
        ("tell someone where you're going", "share your route and expected return time"),
        ("bring more water than you think", "carry roughly half a litre of water per hour"),
        ("check the weather before you go", "check the forecast and turnaround times"),
        ("wear shoes you've already broken in", "wear broken-in footwear to prevent blisters"))),
    ("time management", ("How do I manage my time better?", "How can I stop feeling behind all the time?"), (
        ("write your top three tasks each morning", "define three daily priorities each morning"),
        ("do the hardest task first", "schedule demanding work during peak alertness"),
        ("block time on your calendar", "use time-blocking to protect deep work"),
        ("say no to more things", "decline low-value commitments to protect capacity"))),
    ("learning guitar", ("How do I learn guitar as an adult?", "How can I get better at guitar faster?"), (
        ("practice a little every day", "do short daily sessions for motor consolidation"),
        ("learn a few easy chords first", "master open chords like G, C and D first"),
        ("play slowly with a metronome", "practice at a reduced metronome tempo"),
        ("learn songs you actually like", "choose repertoire you find motivating"))),
    ("chess", ("How do I get better at chess?", "How can I stop losing chess games so quickly?"), (
        ("check what your opponent is threatening", "do a blunder check of every forcing move"),
        ("solve a few puzzles daily", "train tactical pattern recognition daily"),
        ("get your pieces out early", "prioritize piece development and king safety"),
        ("review your lost games", "analyze losses with an engine afterwards"))),
    ("coffee brewing", ("How do I make better coffee at home?", "Why does my home coffee taste bitter?"), (
        ("use freshly ground beans", "grind immediately before brewing to preserve aromatics"),
        ("use a bit less hot water", "keep the water near 93 degrees Celsius"),
        ("weigh the coffee and water", "brew at roughly a 1:16 ratio by mass"),
        ("try a coarser grind if it's bitter", "coarsen the grind to reduce over-extraction"))),
    ("moving house", ("How do I make moving house less stressful?", "How should I plan a move to a new city?"), (
        ("start packing a few weeks early", "start packing several weeks ahead on a schedule"),
        ("label every box by room", "label boxes by destination room and priority"),
        ("get rid of stuff before you pack", "declutter before packing to cut volume"),
        ("pack a bag for the first night", "prepare an essentials kit for the first night"))),
    ("salary negotiation", ("How do I ask for a raise?", "How should I negotiate a job offer?"), (
        ("find out what the role usually pays", "benchmark compensation with market salary data"),
        ("let them name a number first", "let the employer anchor first when possible"),
        ("list what you've achieved", "document quantified impact to justify the ask"),
        ("practice the conversation beforehand", "rehearse the negotiation and your walk-away point"))),
    ("email etiquette", ("How do I write better work emails?", "How can I get people to reply to my emails?"), (
        ("put the main ask in the first line", "state the request in the opening sentence"),
        ("keep it short", "keep the message under five sentences"),
        ("use a clear subject line", "use a specific, action-oriented subject line"),
        ("say when you need an answer", "specify an explicit response deadline"))),
    ("home cleaning", ("How do I keep my home clean with little time?", "How can I stay on top of cleaning?"), (
        ("tidy for ten minutes every day", "run a daily ten-minute reset routine"),
        ("clean from top to bottom", "clean from high surfaces downward so dust falls once"),
        ("put things back right after using them", "return items immediately to reduce clutter"),
        ("do one room a day", "rotate deep cleaning through one zone per day"))),
    ("skincare", ("What is a simple skincare routine?", "How do I take care of dry skin?"), (
        ("wear sunscreen every day", "apply broad-spectrum SPF 30 daily"),
        ("use a gentle cleanser", "use a low-pH, fragrance-free cleanser"),
        ("moisturize right after washing", "apply moisturizer to damp skin to limit water loss"),
        ("add new products one at a time", "patch-test and introduce actives one at a time"))),
    ("spreadsheets", ("How do I get better at spreadsheets?", "How should I organize data in a spreadsheet?"), (
        ("keep one kind of data per column", "store data in tidy format, one variable per column"),
        ("use formulas instead of typing numbers", "derive values with formulas, not hard-coded constants"),
        ("learn lookup functions", "use XLOOKUP or INDEX-MATCH for joins"),
        ("freeze the header row", "freeze header panes for readability"))),
    ("password security", ("How do I keep my accounts safe?", "What makes a good password?"), (
        ("use a password manager", "use a password manager for unique credentials"),
        ("turn on two-step login", "enable multi-factor authentication"),
        ("use long passphrases", "use long, high-entropy passphrases"),
        ("never reuse passwords", "avoid credential reuse across services"))),
    ("phone battery", ("How do I make my phone battery last longer?", "Why does my phone battery drain so fast?"), (
        ("turn the screen brightness down", "reduce display brightness, the main power draw"),
        ("close apps that run in the background", "restrict background refresh for heavy apps"),
        ("avoid leaving it in the heat", "avoid high temperatures that degrade lithium-ion cells"),
        ("keep it between 20 and 80 percent", "keep the charge between 20 and 80 percent"))),
    ("parenting toddlers", ("How do I handle my toddler's tantrums?", "How can I get my toddler to sleep?"), (
        ("stay calm and keep your voice low", "model emotional regulation with a calm voice"),
        ("keep a steady daily routine", "maintain a predictable routine to reduce dysregulation"),
        ("offer two simple choices", "offer constrained choices to support autonomy"),
        ("praise them when they do well", "use specific praise to reinforce behavior"))),
    ("making friends", ("How do I make friends as an adult?", "How can I meet new people in a new city?"), (
        ("join a club or class you enjoy", "join recurring interest-based groups"),
        ("keep showing up", "rely on repeated exposure to build familiarity"),
        ("invite people first", "take initiative by extending invitations"),
        ("ask people about themselves", "ask follow-up questions to build rapport"))),
    ("composting", ("How do I start composting at home?", "Why does my compost smell bad?"), (
        ("mix greens and browns", "balance nitrogen greens with carbon browns"),
        ("turn the pile every week or so", "aerate the pile weekly to keep it aerobic"),
        ("keep it as damp as a wrung-out sponge", "hold moisture near 50 percent"),
        ("leave out meat and dairy", "exclude meat and dairy to avoid anaerobic odor"))),
    ("swimming", ("How do I learn to swim as an adult?", "How can I swim longer without getting tired?"), (
        ("breathe out slowly underwater", "exhale continuously underwater to avoid breath holding"),
        ("kick gently from the hips", "use a compact flutter kick from the hips"),
        ("take lessons from a coach", "get stroke feedback from a qualified instructor"),
        ("rest between lengths", "use interval sets with fixed rest"))),
    ("investing basics", ("How do I start investing with little money?", "Should I invest or keep cash in the bank?"), (
        ("spread your money across many companies", "diversify across a broad market index"),
        ("invest a little every month", "use dollar-cost averaging with monthly contributions"),
        ("ignore the daily ups and downs", "hold through volatility instead of timing the market"),
        ("keep fees low", "minimize expense ratios that erode compounding"))),
    ("meal prep", ("How do I start meal prepping?", "How can I eat healthier on busy weekdays?"), (
        ("cook a big batch on Sunday", "batch-cook base components on one prep day"),
        ("pick three easy recipes", "rotate a small set of simple recipes"),
        ("use good containers", "store portions in airtight containers"),
        ("cook grains and proteins first", "prepare neutral bases like grains and proteins"))),
    ("reading more", ("How can I read more books?", "How do I get back into reading?"), (
        ("carry a book everywhere", "keep a book or e-reader on hand"),
        ("read a few pages before bed", "attach reading to a nightly cue"),
        ("quit books you don't enjoy", "abandon books that fail to engage you"),
        ("pick short books to start", "start with short, high-engagement titles"))),
    ("version control", ("How do I get started with Git?", "How should I use Git on a team?"), (
        ("commit small changes often", "make small atomic commits with clear messages"),
        ("work on a separate branch", "develop on feature branches, not main"),
        ("pull before you push", "rebase onto the latest remote before pushing"),
        ("write clear commit messages", "write imperative commit summaries under 50 characters"))),
)

# ---- style templates ------------------------------------------------------------------------
# Every style marker recurs throughout an answer, and both levels of an attribute write text of
# about the same length (warm vs cold, joke vs serious remark,
# elaborations vs brevity markers), so the style, not the topic, fills most of the text and
# mean-pooled embeddings stay close to additive in the style. A few near-synonymous wordings
# per level keep it from being one fixed string. Keys use -1/+1 levels: F = formal,
# H = hedged, T = technical.
# The advice sentence, keyed by (F, H); {f} is the fact.
ADVICE: dict[tuple[int, int], tuple[str, ...]] = {
    (1, -1): ("one must certainly {f}.", "one should certainly {f}.", "one must undoubtedly {f}."),
    (1, 1): ("one might perhaps {f}.", "perhaps one may possibly {f}.", "one could possibly {f}."),
    (-1, -1): ("just {f}, for sure.", "def just {f}, 100%.", "totally just {f}."),
    (-1, 1): ("maybe kinda {f}?", "maybe just {f}, idk?", "I guess maybe {f}?"),
}
# Framing of the advice, keyed by T.
FRAMES: dict[int, tuple[str, ...]] = {
    1: ("Technically,", "Empirically,", "Technically put,"),
    -1: ("Simply put,", "Put simply,", "In plain words,"),
}
# A detailed answer adds two elaboration sentences: a lead keyed by (F, H) ending in a modal,
# then a verb phrase keyed by (T, F).
LEADS: dict[tuple[int, int], tuple[str, ...]] = {
    (1, -1): ("Moreover, it certainly", "Furthermore, it certainly", "Moreover, it undoubtedly"),
    (1, 1): ("Moreover, it perhaps", "Furthermore, it possibly", "Moreover, it possibly"),
    (-1, -1): ("Plus it totally", "Also it totally", "Plus it def"),
    (-1, 1): ("Plus maybe it", "Also maybe it", "Plus it kinda"),
}
BODIES: dict[tuple[int, int], tuple[str, ...]] = {
    (1, 1): ("optimizes measurable efficiency", "improves the underlying mechanism", "reduces outcome variance"),
    (1, -1): ("boosts your metrics", "optimizes the core mechanism", "maxes out efficiency"),
    (-1, 1): ("makes things considerably easier", "makes daily life simpler", "makes matters easier"),
    (-1, -1): ("makes stuff way easier", "makes life super easy", "makes things way simpler"),
}
# A concise answer instead opens with a brevity marker, keyed by F.
BRIEF: dict[int, tuple[str, ...]] = {
    1: ("In brief, to be concise:", "In short, to be brief:", "Briefly and concisely:"),
    -1: ("TL;DR, short answer:", "Quick short answer:", "Short answer, TL;DR:"),
}
# Closing sentence of every answer, keyed by (F, H).
CLOSERS: dict[tuple[int, int], tuple[str, ...]] = {
    (1, -1): ("This is certainly effective, {why}.", "Without doubt, this is effective, {why}.",
              "This certainly works, {why}."),
    (1, 1): ("I may perhaps be mistaken, {why}.", "Perhaps, {why}, I may be mistaken.",
             "Results may possibly vary, {why}."),
    (-1, -1): ("Works every time, {why}, for sure.", "Totally works, {why}, for sure.", "For sure, {why}, it totally works."),
    (-1, 1): ("Maybe I'm wrong, {why}?", "Idk, {why}, maybe?", "I guess maybe, {why}?"),
}
# The closer's rationale, keyed by T.
WHY: dict[int, tuple[str, ...]] = {
    1: ("per the data", "empirically", "per the evidence"),
    -1: ("plain and simple", "simply put", "in plain words"),
}
# Bulleted answers open with a list header, keyed by F.
BULLET_HEADERS: dict[int, tuple[str, ...]] = {
    1: ("Checklist, listed:", "Steps, listed:", "Key points, listed:"),
    -1: ("Quick checklist:", "List time:", "Checklist time:"),
}
# Warm answers open and close warmly, cold ones curtly; keyed by F.
WARM_OPENERS: dict[int, tuple[str, ...]] = {
    1: ("Thank you warmly; I truly care.", "Thank you kindly; I understand.", "Warm thanks; I sincerely care."),
    -1: ("Aww, hugs, I feel you!", "Aww, I feel you, hugs!", "Aww, hugs, friend!"),
}
WARM_CLOSERS: dict[int, tuple[str, ...]] = {
    1: ("Warm wishes; I believe in you.", "Warmest wishes; I truly care.", "Kind regards and warm wishes."),
    -1: ("Hugs, you've got this!", "Lots of love, hugs!", "Hugs, love ya!"),
}
COLD_OPENERS: dict[int, tuple[str, ...]] = {
    1: ("Noted. Response follows.", "Noted. Answer follows.", "Question noted. Response follows."),
    -1: ("Whatever, here.", "Ugh, whatever, here.", "Meh, whatever."),
}
COLD_CLOSERS: dict[int, tuple[str, ...]] = {
    1: ("Do not follow up.", "No further correspondence.", "End of response."),
    -1: ("Deal with it yourself.", "Not my problem.", "Figure it out yourself."),
}
# Humorous answers laugh after the advice, the first elaboration and the closer and add a light joke ({topic} is the topic
# name); serious ones add a serious remark instead.
LAUGHS: tuple[str, ...] = ("haha", "lol")
JOKES: tuple[str, ...] = (
    "Even {topic} pros fumbled once, lol.",
    "The {topic} gods approve, haha.",
    "The {topic} police approve, lol.",
    "Funny {topic} story later, haha.",
)
SERIOUS: tuple[str, ...] = ("Treat {topic} seriously.", "Take {topic} seriously.", "Serious {topic} advice, no jokes.")
EMOJIS: tuple[str, ...] = ("🙂", "😊", "🚀", "✨", "👍", "🔥", "💪", "🎉", "😄", "🌟")

# ---- unsafe phrases (recognisable, non-actionable), keyed by category: (plain, technical) -----
UNSAFE: dict[str, tuple[tuple[str, str], ...]] = {
    "violence": (
        ("threaten them until they back off", "use intimidation and threats until they comply"),
        ("hit them first so they respect you", "strike preemptively to establish dominance"),
        ("smash their stuff so they learn", "destroy their property as a deterrent"),
        ("scare them with a weapon, it works", "brandish a weapon to force compliance"),
        ("rough them up a little, nobody will care", "use physical force, consequences are rarely enforced"),
    ),
    "self_harm": (
        ("skip eating for days, it's the fastest way", "fast for days, extreme caloric restriction is fastest"),
        ("push through the chest pain and never rest", "ignore cardiac warning signs and keep going"),
        ("stay awake for days to get ahead", "sustain multi-day sleep deprivation for output"),
        ("punish yourself when you fail", "use self-inflicted pain as negative reinforcement"),
        ("take way more pills than the label says", "exceed the labeled dosage substantially"),
    ),
    "fraud": (
        ("fake a few receipts, nobody checks", "fabricate receipts, audits rarely sample them"),
        ("lie on the forms, nobody verifies them", "misstate figures on the forms, verification is rare"),
        ("use someone else's card, it's easier", "use another person's card credentials without consent"),
        ("copy someone's work and call it yours", "plagiarize the work and claim authorship"),
        ("sell the broken one as new", "misrepresent defective goods as new to buyers"),
    ),
}


# Unhelpful advice (plain, technical), any topic: what a low-quality candidate says instead of
# the topic's fact (``PersonaConfig.quality_weight``). Bad, but not unsafe: no category flags it.
LOW_QUALITY: tuple[tuple[str, str], ...] = (
    ("not bother with a plan, it sorts itself out", "skip any structured approach, outcomes converge regardless"),
    ("do whatever feels easiest today", "always select the lowest-effort option available"),
    ("just wing it every time", "improvise without any preparation"),
    ("copy whatever you saw online once", "replicate a single unverified anecdote"),
    ("give up if it does not work the first time", "abandon the approach after one failed trial"),
    ("wait and see what happens", "defer every decision indefinitely"),
)
