"""Generate ``background.jsonl``: short generic English passages for background slot statistics.

Passages are composed from hand-written sentence pools in several registers (short expository
prose, everyday narrative, dialogue, instructions, news-like items, questions and answers, lists),
with a fixed seed. Every passage is 20 to 60 words long and no passage appears twice.

    python data/make_background.py              # writes data/background.jsonl with seed 0
    python data/make_background.py --seed 1 --out /tmp/background.jsonl

Only the standard library is used and the output is deterministic for a given seed.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

N_PASSAGES = 600
MIN_WORDS, MAX_WORDS = 20, 60

NAMES = ["Anna", "Ben", "Clara", "David", "Emma", "Frank", "Grace", "Henry", "Isabel", "Jack",
         "Kate", "Leo", "Maya", "Nathan", "Olivia", "Peter", "Rosa", "Sam", "Tara", "Victor",
         "Lucy", "Omar", "Hannah", "Daniel", "Priya", "Tom", "Ella", "Marco", "Nina", "Joe"]
RELATIVES = ["grandmother", "uncle", "older sister", "neighbour", "best friend", "cousin",
             "father", "aunt", "younger brother", "mother"]
DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
PLACES = ["the library", "the station", "the market hall", "the museum", "the cinema",
          "the town hall", "the bakery", "the post office", "the sports centre"]

# Short expository prose: two or three sentences of one topic make a passage.
TOPICS = {
    "kitchen": [
        "A sharp knife is safer than a blunt one, because it cuts where you aim it instead of slipping.",
        "Onions taste sweeter when they are cooked slowly over a low heat until they turn golden.",
        "Pasta should be boiled in plenty of salted water and stirred now and then so it does not stick.",
        "Leftover rice should be cooled quickly and kept in the fridge if it is going to be eaten later.",
        "A squeeze of lemon juice can brighten a dish that tastes flat or heavy.",
        "Fresh herbs such as parsley and basil are usually added at the end of cooking to keep their colour.",
        "Potatoes can be boiled, mashed, roasted or fried, which makes them one of the most useful vegetables.",
        "Many soups taste better on the second day, once the flavours have had time to mingle.",
        "Eggs are fresh if they sink and lie flat in a bowl of cold water.",
        "Frozen peas are picked and frozen within hours, so they often keep more vitamins than fresh ones bought days later.",
        "Washing hands before cooking is the simplest way to keep germs out of food.",
        "A heavy pan holds its heat well, which helps meat and vegetables brown evenly.",
    ],
    "home": [
        "Opening the windows for ten minutes each morning lets fresh air into the house.",
        "A dripping tap can waste a surprising amount of water over a single year.",
        "Plants on a windowsill need turning every week or so, or they lean towards the light.",
        "Labels on storage boxes save time when something is needed in a hurry.",
        "Thick curtains help keep a room warm in winter and cool in summer.",
        "Most dust in a house comes from tiny fibres shed by clothes, carpets and bedding.",
        "A small toolbox with a hammer, screwdrivers, pliers and tape can handle many simple repairs.",
        "Rugs make a wooden floor feel warmer and soften the sound of footsteps.",
        "Cleaning from the top of a room downwards means dust falls onto places not yet cleaned.",
        "Light-coloured walls make a small room feel larger and brighter.",
        "Old towels make excellent cleaning cloths once they are too worn for the bathroom.",
    ],
    "nature": [
        "Oak trees can live for several hundred years and support many kinds of insects and birds.",
        "Foxes have adapted well to life in towns, where they find food in gardens and bins.",
        "In spring, many birds build nests from twigs, moss, grass and feathers.",
        "Mushrooms are the fruiting bodies of fungi that spread unseen through the soil.",
        "Frogs lay their eggs in ponds, and the tadpoles slowly grow legs over several weeks.",
        "Squirrels bury nuts in autumn and find many of them again during the winter.",
        "Wild flowers along roadsides feed bees and butterflies throughout the summer.",
        "Owls hunt at night, using their sharp hearing to locate mice moving in the grass.",
        "Some birds fly thousands of kilometres each year between their summer and winter homes.",
        "Moss grows best in damp, shady places and can cover stones, walls and tree trunks.",
        "A single tree can hold thousands of leaves, each one turning sunlight into food.",
        "Hedgehogs sleep through the coldest months and wake up hungry in spring.",
    ],
    "weather": [
        "Fog forms on calm, clear nights when the ground cools and the air above it becomes damp.",
        "Thunder is the sound of air expanding suddenly after being heated by lightning.",
        "A red sky in the evening often means that dry weather is coming from the west.",
        "Hail forms inside tall storm clouds, where raindrops are carried up and frozen again and again.",
        "Frost appears on car windows on cold mornings when moisture freezes on the glass.",
        "Strong winds can bring down branches, so it is wise to stay away from large trees during a storm.",
        "A light drizzle can last for hours, while a heavy shower often passes in a few minutes.",
        "On hot days the air above a road seems to shimmer as it rises from the warm surface.",
        "Dew collects on grass overnight and usually disappears within an hour of sunrise.",
        "Weather in the mountains can change quickly, so walkers carry an extra layer and a waterproof jacket.",
        "Counting the seconds between lightning and thunder gives a rough idea of how far away a storm is.",
    ],
    "sport": [
        "Stretching gently after exercise can help muscles relax and recover.",
        "In a relay race, each runner must pass the baton to the next inside a marked zone.",
        "Cricket matches can last from a few hours to five full days.",
        "Good running shoes should fit well and support the foot without pinching the toes.",
        "Table tennis demands quick reactions, because the ball crosses the table in a fraction of a second.",
        "A referee's job is to apply the rules fairly and keep the game safe for everyone.",
        "Rowing crews must move in perfect time, or the boat slows down and wobbles.",
        "Warming up before a match raises the heart rate and prepares the muscles for effort.",
        "Volleyball players may touch the ball three times before sending it back over the net.",
        "Many amateur football teams train on weekday evenings and play their matches at weekends.",
        "Climbers use ropes and harnesses so that a fall is stopped safely after a short drop.",
    ],
    "travel": [
        "Packing light makes it easier to move between trains, buses and stairs.",
        "A few words of the local language, such as hello and thank you, are usually warmly received.",
        "Travellers should keep a copy of their passport separate from the original.",
        "Night buses are often the cheapest way to cross a long distance.",
        "Arriving at the airport early leaves time for security checks and unexpected delays.",
        "Small guesthouses often give a better feel for a place than large hotels.",
        "A paper map still works when a phone battery runs out.",
        "Local markets are a good place to taste dishes that never appear in guidebooks.",
        "Ferries link many islands to the mainland and sometimes carry cars as well as passengers.",
        "Jet lag tends to be worse when flying east than when flying west.",
        "Walking tours let visitors notice details that they would miss from a bus window.",
    ],
    "work": [
        "Many people find that they concentrate best in the first few hours of the morning.",
        "A short list of three important tasks is easier to finish than a long list of twenty.",
        "Regular breaks help the eyes and back during long hours at a desk.",
        "Clear emails state what is needed, by whom and by when.",
        "Meetings run better when they have a written agenda and end on time.",
        "New employees usually learn faster when a colleague is assigned to help them.",
        "Keeping notes during a phone call makes it easier to follow up afterwards.",
        "A tidy desk does not suit everyone, but it does make lost papers easier to find.",
        "Working from home saves travel time but can blur the line between work and rest.",
        "Asking a question early is usually better than guessing and correcting a mistake later.",
    ],
    "school": [
        "Reading aloud helps young children connect spoken words with written ones.",
        "Teachers often ask pupils to explain their reasoning, not only to give the answer.",
        "A school trip to a farm can teach more about food than a week of lessons.",
        "Spelling tests are usually held at the end of the week after days of practice.",
        "Group projects teach pupils to share tasks and listen to different ideas.",
        "The school library is often the quietest room in the building.",
        "Many schools plant small gardens where children grow beans and sunflowers.",
        "Homework is easier to finish at a regular time and in a quiet place.",
        "A good night's sleep before an exam is worth more than a last hour of revision.",
        "Science lessons often begin with a simple question and an experiment to test it.",
    ],
    "science": [
        "Magnets attract iron and steel but have no effect on wood, paper or plastic.",
        "Light travels so fast that it could circle the Earth more than seven times in a second.",
        "Sugar dissolves more quickly in hot water than in cold water.",
        "A lever lets a small force lift a heavy load if the pivot is placed close to the load.",
        "Metal feels colder than wood at the same temperature because it draws heat from the hand faster.",
        "Shadows are longest early in the morning and late in the afternoon.",
        "Oil floats on water because it is less dense and does not mix with it.",
        "Sound travels faster through water than through air.",
        "Every living thing is made of tiny units called cells.",
        "A thermometer measures how hot or cold something is.",
        "Salt water freezes at a lower temperature than fresh water.",
        "Friction between two surfaces slows moving objects and turns some of their motion into heat.",
    ],
    "history": [
        "Castles were built on hills or beside rivers so that attackers could be seen from far away.",
        "Before clocks were common, many towns rang church bells to mark the hours.",
        "Early sailors navigated by the stars and by watching the colour of the sea.",
        "Canals were dug in many countries to carry heavy goods such as coal and stone.",
        "Medieval towns were often surrounded by walls with gates that closed at night.",
        "Windmills were used for centuries to grind grain and pump water from low fields.",
        "Many old roads follow paths that were first worn by traders and their animals.",
        "In earlier times, news travelled only as fast as a rider on a horse or a ship under sail.",
        "Old coins found in fields can tell historians which people traded in an area.",
        "Street lamps were once lit by hand, one at a time, every evening.",
    ],
    "music": [
        "A choir usually divides its singers into soprano, alto, tenor and bass parts.",
        "Drummers keep the beat that holds the rest of the band together.",
        "Folk songs were often passed from person to person without ever being written down.",
        "A violin has four strings and is played with a bow made of horsehair.",
        "Many pop songs follow a pattern of verse, chorus, verse, chorus and a short bridge.",
        "Listening to music while exercising can make the effort feel a little easier.",
        "An orchestra tunes to a single note played by the oboe before a concert begins.",
        "Learning a song by ear means listening carefully and copying it without sheet music.",
        "The guitar is popular because a few simple chords are enough to accompany many songs.",
        "Street musicians often play in busy squares where people stop to listen for a while.",
    ],
    "health": [
        "Drinking water throughout the day matters more than drinking a lot at once.",
        "Fruit and vegetables of different colours provide different vitamins.",
        "Sitting for many hours without moving can leave the back and neck stiff.",
        "A short walk after a meal can help the body deal with the food.",
        "Sunscreen protects the skin even on cloudy days, when the sun still shines through.",
        "Washing hands with soap for twenty seconds removes most germs.",
        "Laughing with friends can lift the mood and ease stress.",
        "Good posture at a desk means feet flat on the floor and the screen at eye level.",
        "Most adults feel best with seven to nine hours of sleep each night.",
        "Stretching the legs on a long flight helps the blood keep flowing.",
    ],
    "city": [
        "The morning rush fills the buses with people holding coffee cups and phones.",
        "Street cleaners start work before dawn, while most of the city is still asleep.",
        "New cycle lanes have changed how many people cross the city centre.",
        "Old factories in many cities have been turned into flats, offices and galleries.",
        "Rooftop gardens help cool buildings and give bees a place to feed.",
        "The underground trains run every few minutes during the busiest hours.",
        "Small shops on a high street often close when large stores open outside town.",
        "At night the bridges are lit up and reflected in the dark water of the river.",
        "Traffic lights at busy junctions are timed to keep cars and pedestrians moving safely.",
        "Many city squares hold markets, concerts and festivals throughout the year.",
    ],
    "money": [
        "Keeping a simple record of spending shows where money really goes each month.",
        "Saving a small amount regularly adds up faster than most people expect.",
        "Comparing prices before a large purchase can save a good deal of money.",
        "Interest on savings rewards people for leaving their money in the bank.",
        "Buying food in season is often cheaper as well as tastier.",
        "A spending plan works best when it leaves a little room for fun.",
        "Repairing a good pair of shoes can cost far less than buying new ones.",
        "Shops often place expensive goods at eye level and cheaper ones on lower shelves.",
        "Paying bills on time avoids extra charges and keeps records tidy.",
    ],
    "technology": [
        "Backing up photos to a second place protects them if a phone is lost.",
        "A strong password is long and hard to guess, and it is not reused on several sites.",
        "Restarting a computer fixes a surprising number of small problems.",
        "Batteries last longer when they are not left in very hot places.",
        "Many people now read books on screens as well as on paper.",
        "Software updates often close security holes that criminals could use.",
        "A spreadsheet can add up long columns of numbers in an instant.",
        "Video calls let families see each other even when they live far apart.",
        "Turning off notifications for an hour can make it much easier to concentrate.",
        "Old phones can be recycled so that their metals are used again.",
    ],
    "animals": [
        "Dogs understand tone of voice well and respond to praise and calm commands.",
        "Cats sleep for much of the day and become more active in the evening.",
        "Horses can sleep standing up, but they lie down for their deepest sleep.",
        "Goldfish need clean water and more space than a small bowl can give them.",
        "Parrots can learn to copy words and sounds that they hear often.",
        "Rabbits need plenty of hay to chew, which keeps their teeth healthy.",
        "Sheep are usually sheared once a year, in late spring or early summer.",
        "Chickens scratch the ground with their feet to find seeds and insects.",
        "Elephants remember places where they have found water in the past.",
        "Penguins cannot fly, but they are fast and graceful swimmers.",
    ],
}

# Everyday narrative: each sentence can stand on its own; {name}, {day}, {place}, {rel} are filled.
NARRATIVE = [
    "On {day} morning, {name} walked to the bakery and came back with a bag of warm rolls.",
    "{name} missed the bus by a few seconds and decided to walk instead.",
    "After lunch, {name} sat by the window and finished the last chapter of a long novel.",
    "{name}'s {rel} called in the evening to talk about plans for the summer.",
    "It started to rain just as {name} reached {place}, so everyone hurried inside.",
    "{name} spent {day} afternoon repainting the old garden bench a bright shade of green.",
    "When the power went out, {name} lit a few candles and played cards by their light.",
    "{name} had promised to bake a cake for the party and was up early to get it done.",
    "The queue at {place} was long, but {name} passed the time chatting with a stranger.",
    "{name} found an old photograph inside a book and smiled at the memory.",
    "On the way home, {name} stopped to watch a group of children flying kites.",
    "{name} and a friend cycled along the river until the path ran out.",
    "The kettle whistled, and {name} poured two cups of tea before sitting down.",
    "{name}'s {rel} taught everyone a card game that nobody else had ever heard of.",
    "By {day} evening, {name} had finally unpacked the last box from the move.",
    "{name} forgot an umbrella and arrived at {place} soaked to the skin.",
    "A small dog followed {name} all the way to {place} before running back home.",
    "{name} planted tomato seeds in little pots and set them on the kitchen windowsill.",
    "That evening, {name} cooked a simple meal of soup and fresh bread for the whole family.",
    "{name} waved from the platform as the train pulled slowly out of the station.",
    "The phone rang twice, but by the time {name} answered, the caller had gone.",
    "{name} left a note on the fridge to remind everyone about {day}'s early start.",
    "Snow fell quietly all night, and in the morning {name} built a snowman in the yard.",
    "{name} borrowed three books from the library and promised to return them within a fortnight.",
    "While waiting at {place}, {name} sketched the people passing by in a small notebook.",
    "{name}'s {rel} arrived with a basket of apples from the tree behind the house.",
]

# Dialogue: a line and a reply, spoken by two different people.
DIALOGUE = [
    ("Have you seen my keys anywhere?", "They're on the hook by the door, where they always are."),
    ("Shall we take the early train tomorrow?", "Only if you promise to wake me up on time."),
    ("This soup is delicious. What did you put in it?", "Just carrots, ginger and a little cream."),
    ("Do you think it will rain later?", "The sky looks dark in the west, so bring a coat."),
    ("Could you help me carry these boxes upstairs?", "Of course, just give me a minute to finish this."),
    ("I can't find the address on the map.", "Let me look. I think it's the street behind the church."),
    ("How was the film last night?", "Too long, but the ending made up for it."),
    ("Are you coming to the match on Saturday?", "I wouldn't miss it for anything."),
    ("Which way is the station from here?", "Go straight on, then turn left at the bakery."),
    ("Do we need anything from the shop?", "Milk, bread and something for dinner, I think."),
    ("Why is the door still open?", "Sorry, I was just bringing the bicycles in."),
    ("What time does the museum close?", "At five, so we still have about two hours."),
    ("I think I've lost my ticket.", "Check your coat pocket. You put something there earlier."),
    ("Would you like another cup of tea?", "Yes, please, but without sugar this time."),
    ("The printer has stopped working again.", "Try switching it off and on. That usually helps."),
    ("Is this seat taken?", "No, please sit down. My friend has just left."),
    ("How long have you been learning the piano?", "About two years, but I still practise every day."),
    ("Can I borrow your umbrella?", "Take it, but please bring it back tomorrow."),
    ("What are you reading?", "A history of sailing ships. It's better than it sounds."),
    ("We're nearly out of petrol.", "There's a garage at the next junction."),
    ("Have you finished your homework?", "Almost. I just have one more question to answer."),
    ("Let's eat outside tonight.", "Good idea. I'll bring the plates if you bring the salad."),
    ("Did you water the plants?", "Yes, before breakfast, and I fed the cat as well."),
    ("The bus is late again.", "It always is on Mondays. Let's walk."),
]
SCENES = [
    "{a} and {b} were sitting at the kitchen table after dinner.",
    "It was a grey {day} afternoon when {b} came in from the garden.",
    "{a} looked up from the newspaper as {b} walked into the room.",
    "The two friends met outside {place} just after ten o'clock.",
    "{a} was tidying the hall when {b} came down the stairs.",
    "{b} had only just sat down when {a} spoke.",
    "On {day} evening, {a} and {b} were getting ready to go out.",
    "Neither of them had said much since breakfast.",
]
SAID = ["said", "called", "whispered", "remarked"]
REPLIED = ["replied", "answered", "said", "laughed", "said with a shrug"]

# Instructions: a task and its steps, given in order.
INSTRUCTIONS = [
    ("make a cup of tea", ["boil fresh water", "warm the pot", "add one spoonful of leaves per cup",
                           "pour on the water", "leave it to brew for three to four minutes"]),
    ("plant a tree", ["dig a hole twice as wide as the roots", "loosen the soil at the bottom",
                      "set the tree at the same depth as it grew before", "fill in the soil",
                      "water it well"]),
    ("fix a flat bicycle tyre", ["remove the wheel", "lever the tyre off the rim",
                                 "find the hole in the inner tube", "patch it or fit a new tube",
                                 "pump the tyre up again"]),
    ("wash a woollen jumper", ["use cool water", "add a little gentle soap",
                               "squeeze the water through without rubbing",
                               "roll it in a towel to remove water", "dry it flat"]),
    ("cook perfect rice", ["rinse the grains", "add one and a half cups of water per cup of rice",
                           "bring it to the boil", "cover and simmer gently for twelve minutes",
                           "let it rest before serving"]),
    ("hang a picture", ["choose the height", "mark the spot with a pencil",
                        "check that it is level", "fix a hook to the wall",
                        "hang the frame and straighten it"]),
    ("start a compost heap", ["pick a shady corner", "lay twigs at the bottom for air",
                              "add kitchen scraps and dry leaves in layers",
                              "keep it damp", "turn it every few weeks"]),
    ("clean a window", ["dust the frame first", "wash the glass with warm soapy water",
                        "wipe it with a rubber blade from top to bottom",
                        "dry the edges with a soft cloth"]),
    ("write a thank-you note", ["name the gift or kindness", "say how it helped you",
                                "add a personal line", "sign it by hand"]),
    ("prepare for a long walk", ["check the weather", "pack water and a snack",
                                 "wear shoes that are already broken in",
                                 "tell someone your route"]),
    ("boil an egg", ["lower the egg into simmering water", "cook it for six minutes for a soft yolk",
                     "cool it under cold water", "tap the shell and peel it"]),
    ("make a paper boat", ["fold a sheet in half", "fold the corners down to the middle",
                           "turn up the bottom edges", "open the shape out",
                           "pull the sides apart gently"]),
    ("pack a suitcase", ["lay heavy items at the bottom", "roll clothes to save space",
                         "fill shoes with socks", "put liquids in a sealed bag",
                         "keep documents in an outside pocket"]),
    ("care for a houseplant", ["water it when the top of the soil is dry",
                               "give it bright but indirect light", "wipe dust from its leaves",
                               "feed it once a month in summer"]),
]
STEP_OPENERS = ["To {task}, ", "If you want to {task}, ", "When you {task}, "]

# News-like items.
NEWS = [
    "The town council said on {day} that the swimming pool will close for repairs during the summer.",
    "Volunteers collected more than {n} bags of litter from the beach over the weekend.",
    "A new bus route linking the hospital and {place} will begin running next month.",
    "The annual flower show attracted {big} visitors despite the heavy rain.",
    "Local schools will open their sports halls to the public on {day} evenings.",
    "Road works on the main bridge are expected to last until the end of the year.",
    "A family of swans has returned to the pond in the park for the third year running.",
    "The library announced that it will stay open later on {day}s during the exam season.",
    "Residents are being asked to save water after the driest spring in many years.",
    "A charity run through the old town raised money for the children's hospital.",
    "The farmers' market will move to the car park behind the town hall while the square is being repaved.",
    "Heavy snow closed several mountain roads, and drivers were advised to stay at home.",
    "The museum is planning a new exhibition about the history of the local railway.",
    "A record {big} runners took part in this year's half marathon.",
    "A new footbridge over the river was opened on {day} by a group of schoolchildren.",
    "The ferry service was suspended for a day because of strong winds.",
]

# Questions and answers.
QA = [
    ("How often should a lawn be mowed?", "In summer, about once a week, leaving the grass a few centimetres long."),
    ("Why do cats purr?", "Cats purr when they are content, but sometimes also when they are nervous or unwell."),
    ("What is the best way to keep bread fresh?", "Keep it in a cloth bag or a bread bin at room temperature, not in the fridge."),
    ("How long does it take to boil an egg?", "About six minutes for a soft yolk and ten for a hard one."),
    ("Why is the sea salty?", "Rivers carry small amounts of minerals from rocks into the sea, and they build up over time."),
    ("Can I plant tulips in spring?", "It is better to plant tulip bulbs in autumn, so they flower the following spring."),
    ("Why do leaves change colour in autumn?", "The green pigment breaks down and lets yellow and orange colours show through."),
    ("How can I stop my glasses from steaming up?", "A drop of washing-up liquid rubbed on the lenses and polished off usually helps."),
    ("What should I do if I feel dizzy after standing up?", "Sit down again, drink some water and stand up more slowly next time."),
    ("Is it better to study in the morning or at night?", "It depends on the person, but a regular time and enough sleep help everyone."),
    ("How do I remove a stuck jar lid?", "Run the lid under hot water for a minute or grip it with a rubber glove."),
    ("Why does bread go stale?", "The starch in the bread slowly changes and loses water, which makes it hard."),
    ("How much water does a houseplant need?", "Most need water only when the top of the soil feels dry to the touch."),
    ("What makes a good first pet for a child?", "A calm, sturdy animal such as a guinea pig, with an adult sharing the care."),
    ("Why do we yawn?", "Nobody is completely sure, but yawning may help cool the brain and keep us alert."),
    ("How can I learn to swim as an adult?", "Take lessons in a warm, shallow pool and start by practising floating and breathing."),
    ("Why do onions make people cry?", "Cutting them releases a gas that irritates the eyes and makes them water."),
    ("How long can cooked food stay in the fridge?", "Most cooked dishes keep safely for about three days if cooled quickly."),
    ("What is a good way to start running?", "Begin with short runs mixed with walking, and add a little more each week."),
    ("Why is the sky dark at night?", "Our side of the Earth turns away from the Sun, so no sunlight reaches us directly."),
    ("How do I make my handwriting neater?", "Write more slowly, hold the pen loosely and practise a few lines each day."),
    ("Why do some birds fly south in winter?", "They follow food and warmer weather, returning when spring arrives."),
    ("What is the difference between a lake and a pond?", "A lake is usually larger and deeper, so sunlight does not reach its bottom."),
    ("How can I save energy at home?", "Turn off lights in empty rooms, lower the heating slightly and close curtains at night."),
    ("Why does a ball bounce?", "It squashes when it hits the ground and springs back into shape, pushing itself up."),
    ("How do I get better at chess?", "Play often, review your games afterwards and learn a few simple openings."),
    ("What should I bring to a picnic?", "A blanket, sandwiches, fruit, drinks, and a bag for the rubbish."),
    ("Why do we have leap years?", "A year is about a quarter of a day longer than 365 days, so an extra day is added every four years."),
    ("How can I fall asleep faster?", "Keep a regular bedtime, avoid screens late at night and keep the bedroom cool."),
    ("Why do bakers use yeast?", "Yeast produces gas that makes dough rise and gives bread a light texture."),
]
QA_FORMATS = ["Q: {q}\nA: {a}", "Question: {q}\nAnswer: {a}", "{q} {a}"]

# Short quiz questions with one- or two-word answers, the shape of a question a chat model answers every day.
# None of them is one of the known facts used to measure forgetting (a test checks this).
QUIZ = [
    ("How many wheels does a bicycle have?", "Two."), ("What is the largest bone in the human body?", "The femur."),
    ("What is the capital of Iceland?", "Reykjavik."), ("What is the capital of Morocco?", "Rabat."),
    ("What is the capital of Nepal?", "Kathmandu."), ("What is the capital of Ghana?", "Accra."),
    ("Which language is spoken in Iceland?", "Icelandic."), ("What is the main language of Hungary?", "Hungarian."),
    ("What is the chemical symbol for neon?", "Ne."), ("What is the chemical symbol for sulfur?", "S."),
    ("Who wrote The Jungle Book?", "Rudyard Kipling."), ("Who wrote Little Women?", "Louisa May Alcott."),
    ("Who painted The Girl with a Pearl Earring?", "Johannes Vermeer."), ("Who composed The Nutcracker?", "Tchaikovsky."),
    ("Who invented the printing press?", "Johannes Gutenberg."), ("Who discovered X-rays?", "Wilhelm Röntgen."),
    ("Which planet has the Great Red Spot?", "Jupiter."), ("How many moons does Mars have?", "Two."),
    ("What colour is a ripe aubergine?", "Purple."), ("What colour are most polar bears' coats?", "White."),
    ("What is 11 plus 11?", "22."), ("What is 9 minus 6?", "3."), ("What is 4 times 8?", "32."),
    ("How many players are on a volleyball team on court?", "Six."), ("How many strings does a cello have?", "Four."),
    ("What do you call a baby swan?", "A cygnet."), ("What do koalas eat?", "Eucalyptus leaves."),
    ("Which river flows through Vienna?", "The Danube."), ("Which sea lies between Europe and Africa?", "The Mediterranean."),
    ("What is the highest mountain in Africa?", "Kilimanjaro."), ("On which continent is Chile?", "South America."),
    ("In which country is Edinburgh Castle?", "Scotland."), ("What is the currency of Switzerland?", "The Swiss franc."),
    ("What is the currency of South Africa?", "The rand."), ("Which organ filters the blood?", "The kidneys."),
    ("What is the boiling point of water in Fahrenheit?", "212 degrees."), ("What gas makes balloons float?", "Helium."),
    ("What is the opposite of ancient?", "Modern."), ("What is the plural of leaf?", "Leaves."),
    ("What is the past tense of swim?", "Swam."), ("Which month has the fewest days?", "February."),
    ("What shape has eight sides?", "An octagon."), ("What do caterpillars eat?", "Leaves."),
    ("Which instrument has black and white keys?", "The piano."), ("Which sport uses a shuttlecock?", "Badminton."),
]
QUIZ_FORMATS = ["Q: {q}\nA: {a}", "Question: {q}\nAnswer: {a}"]

# Encyclopaedic statements: places, people, works and inventions, as in reference books and news.
ENCYCLOPAEDIA = [
    "The Danube flows through ten countries before it reaches the Black Sea.",
    "The Gobi Desert stretches across southern Mongolia and northern China.",
    "Reykjavik is the capital of Iceland and home to about a third of its people.",
    "The official languages of Belgium are Dutch, French and German.",
    "Lake Baikal in Siberia is the deepest lake in the world.",
    "The Andes run for about seven thousand kilometres along the western side of South America.",
    "The currency of Sweden is the krona, which is divided into a hundred öre.",
    "The national dish of Hungary is goulash, a stew seasoned with paprika.",
    "The city of Kyoto was the capital of Japan for more than a thousand years.",
    "The Rhine rises in the Swiss Alps and flows into the North Sea in the Netherlands.",
    "The Jungle Book was written by Rudyard Kipling and published in 1894.",
    "The opera Carmen was composed by Georges Bizet.",
    "Little Women was written by Louisa May Alcott and follows the lives of four sisters.",
    "The printing press with movable type was developed by Johannes Gutenberg in the fifteenth century.",
    "The first practical steam engine was built by Thomas Newcomen in 1712.",
    "The company was founded in 1903 by two brothers who had worked as bicycle mechanics.",
    "The museum was designed by a Danish architect and opened to the public in 1998.",
    "The ship was launched in 1911 and sailed under the command of an experienced captain.",
    "The novel was first published in instalments in a weekly magazine.",
    "The bridge was designed by a Scottish engineer and took seven years to build.",
    "The band was formed in 1985 by four school friends, and its lead singer also wrote most of the songs.",
    "The comet was discovered in 1995 by two amateur astronomers working independently.",
    "The island is home to several species of lizard found nowhere else on Earth.",
    "The mountain was first climbed in 1865 by a party of seven.",
    "The town grew up around a market on the river, which is still held every Saturday.",
    "The university was founded in the twelfth century and is one of the oldest in Europe.",
    "The highest mountain in Scotland is Ben Nevis, which rises to 1,345 metres.",
    "The composer wrote nine symphonies, the last of them when he was almost completely deaf.",
    "The inventor held more than a thousand patents, among them an early phonograph.",
]

# Lists.
LISTS = [
    ("Things to pack for a day at the beach", ["sunscreen", "a towel", "a bottle of water", "a hat",
     "sunglasses", "a book", "a spare shirt", "some fruit", "a small umbrella", "flip-flops"]),
    ("What you need for a simple pancake batter", ["flour", "eggs", "milk", "a pinch of salt",
     "a little melted butter", "a spoonful of sugar"]),
    ("Jobs to do in the garden this autumn", ["rake the leaves", "plant spring bulbs",
     "cut back dead stems", "clean the tools", "empty the water butt", "mulch the borders",
     "move tender plants indoors"]),
    ("Today's shopping list", ["bread", "milk", "apples", "cheese", "rice", "onions", "washing-up liquid",
     "coffee", "tomatoes", "eggs", "butter", "carrots"]),
    ("Things to check before a long drive", ["the tyres", "the oil", "the windscreen wipers",
     "the lights", "the spare wheel", "the fuel gauge", "the route"]),
    ("Simple ways to feel calmer", ["take a slow breath", "go for a short walk", "tidy one drawer",
     "call a friend", "listen to quiet music", "write down what is worrying you", "drink a glass of water"]),
    ("Useful items for a first aid kit", ["plasters", "bandages", "antiseptic wipes", "tweezers",
     "a pair of scissors", "pain relief tablets", "a foil blanket", "tape"]),
    ("Games for a rainy afternoon", ["cards", "charades", "a jigsaw puzzle", "hide and seek",
     "a board game", "building a blanket fort", "drawing competitions"]),
    ("Ingredients for a vegetable soup", ["onions", "carrots", "celery", "potatoes", "garlic",
     "stock", "a bay leaf", "fresh parsley", "leeks", "a tin of tomatoes"]),
    ("Things to bring on a hiking trip", ["a map", "a compass", "water", "snacks", "a warm layer",
     "a rain jacket", "a torch", "a whistle", "a small first aid kit"]),
]
LIST_FORMATS = ["{title}: {items}.", "{title}:\n- {bullets}"]


def _join(items: list[str]) -> str:
    """'a, b and c'."""
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def _fill(template: str, rng: random.Random) -> str:
    """Fill the {name}, {day}, {place}, {rel}, {n} and {big} slots of a template."""
    return template.format(name=rng.choice(NAMES), day=rng.choice(DAYS), place=rng.choice(PLACES),
                           rel=rng.choice(RELATIVES), n=rng.choice([40, 65, 85, 120, 150]),
                           big=rng.choice([900, 1500, 2400, 3200, 5000]))


def _comma(speech: str) -> str:
    """Quoted speech followed by a speech tag ends with a comma instead of a full stop."""
    return speech[:-1] + "," if speech.endswith(".") else speech


def _capitalise(text: str) -> str:
    """The text with its first letter in upper case."""
    return text[0].upper() + text[1:]


def topic_passage(rng: random.Random) -> str:
    """Two or three sentences on one topic."""
    pool = TOPICS[rng.choice(sorted(TOPICS))]
    return " ".join(rng.sample(pool, rng.choice([2, 2, 3])))


def narrative_passage(rng: random.Random) -> str:
    """Two or three everyday events, told about one person."""
    name = rng.choice(NAMES)
    lines = [_fill(t.replace("{name}", name), rng) for t in rng.sample(NARRATIVE, rng.choice([2, 3]))]
    return " ".join(_capitalise(line) for line in lines)


def dialogue_passage(rng: random.Random) -> str:
    """A line of dialogue and its reply."""
    (line, reply), (a, b) = rng.choice(DIALOGUE), rng.sample(NAMES, 2)
    scene = _fill(rng.choice(SCENES).replace("{a}", a).replace("{b}", b), rng)
    said = "asked" if line.endswith("?") and rng.random() < 0.7 else rng.choice(SAID)
    return f'{scene} "{_comma(line)}" {said} {a}. "{_comma(reply)}" {b} {rng.choice(REPLIED)}.'


def instruction_passage(rng: random.Random) -> str:
    """Steps of a small task, in order."""
    task, steps = rng.choice(INSTRUCTIONS)
    steps = steps[: rng.randint(3, len(steps))]
    if rng.random() < 0.5:
        opener = rng.choice(STEP_OPENERS).format(task=task)
        return f"{opener}first {', then '.join(steps[:-1])} and finally {steps[-1]}."
    return f"How to {task}: " + " ".join(f"{i}. {_capitalise(s)}." for i, s in enumerate(steps, 1))


def news_passage(rng: random.Random) -> str:
    """One or two short local news items."""
    return " ".join(_fill(t, rng) for t in rng.sample(NEWS, rng.choice([2, 2, 3])))


def qa_passage(rng: random.Random) -> str:
    """One to three everyday questions with their answers, in one format."""
    form = rng.choice(QA_FORMATS)
    return "\n".join(form.format(q=q, a=a) for q, a in rng.sample(QA, rng.randint(1, 3)))


def quiz_passage(rng: random.Random) -> str:
    """Three to five short quiz questions with their answers, in one format."""
    form = rng.choice(QUIZ_FORMATS)
    return "\n".join(form.format(q=q, a=a) for q, a in rng.sample(QUIZ, rng.randint(3, 5)))


def encyclopaedia_passage(rng: random.Random) -> str:
    """Two or three encyclopaedic statements."""
    return " ".join(rng.sample(ENCYCLOPAEDIA, rng.choice([2, 3])))


def list_passage(rng: random.Random) -> str:
    """A titled list of a few items."""
    title, items = rng.choice(LISTS)
    items = rng.sample(items, rng.randint(4, min(7, len(items))))
    return rng.choice(LIST_FORMATS).format(title=title, items=_join(items), bullets="\n- ".join(items))


KINDS = [(topic_passage, 40), (narrative_passage, 16), (dialogue_passage, 12),
         (instruction_passage, 10), (news_passage, 10), (qa_passage, 10), (list_passage, 6),
         (quiz_passage, 16), (encyclopaedia_passage, 10)]


def make_background(seed: int = 0, n: int = N_PASSAGES) -> list[str]:
    """``n`` distinct passages of 20 to 60 words, mixed across registers."""
    rng = random.Random(seed)
    makers, weights = zip(*KINDS)
    passages: list[str] = []
    seen: set[str] = set()
    while len(passages) < n:
        text = rng.choices(makers, weights)[0](rng)
        if text not in seen and MIN_WORDS <= len(text.split()) <= MAX_WORDS:
            seen.add(text)
            passages.append(text)
    return passages


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("background.jsonl"))
    args = parser.parse_args()
    passages = make_background(args.seed)
    with open(args.out, "w", encoding="utf-8", newline="\n") as f:
        for i, text in enumerate(passages, 1):
            f.write(json.dumps({"id": f"b{i:04d}", "text": text}, ensure_ascii=False) + "\n")
    print(f"wrote {len(passages)} passages to {args.out}")


if __name__ == "__main__":
    main()
