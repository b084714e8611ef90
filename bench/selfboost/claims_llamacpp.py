# Pseudo claims for N sampled SciFact abstracts from a llama.cpp server
# (xllamacpp's, as the tests start it), written in rir's queries.jsonl layout:
# the prompt experiment behind the 'Qwen 0.5B v1 claims' row of BENCHMARKS.
# usage: claims_llamacpp.py PORT N OUT.jsonl v1 SCIFACT_DIR
import json, sys, random, urllib.request, concurrent.futures as cf
port, n, out, variant, S = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5]
docs=[json.loads(l) for l in open(f'{S}/corpus.jsonl')]
rnd=random.Random(42); sample=rnd.sample(docs, n)
P={'v1': "Read the following scientific paper abstract and write one scientific claim that it supports: a single declarative sentence of {length} that states one specific finding, in your own words. Do not copy the title or sentences of the abstract. Reply with the claim only.\n\nAbstract: {text}"}[variant]
lengths=["less than 10 words","8 to 12 words","10 to 15 words"]
def one(i_d):
    i,d=i_d; L=random.Random(i).choice(lengths)
    p=P.format(text=d['text'][:1000], length=L)
    req=json.dumps({"messages":[{"role":"user","content":p}],"temperature":0.7,"top_p":0.9,"max_tokens":40,"seed":i}).encode()
    r=json.load(urllib.request.urlopen(urllib.request.Request(f"http://127.0.0.1:{port}/v1/chat/completions",data=req,headers={"Content-Type":"application/json"})))
    q=r['choices'][0]['message']['content'].strip().split('\n')[0].strip().strip('"')
    return {"_id":f"pq{i}","text":q,"passage_id":d['_id'],"length":L,"style":""}
with cf.ThreadPoolExecutor(2) as ex, open(out,'w') as o:
    for k,r in enumerate(ex.map(one, enumerate(sample))):
        if len(r['text'].split())>=3: o.write(json.dumps(r)+'\n')
        if k%50==0: print(k, r['text'], file=sys.stderr, flush=True)
