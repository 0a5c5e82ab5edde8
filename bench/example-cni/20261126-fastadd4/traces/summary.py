import sys,re,collections,statistics as st
rows=[]
for l in open(sys.argv[1]):
    f=l.split(); d={}
    for kv in f[1:]:
        k,v=kv.split('=',1); d[k]=v
    rows.append(d)
for sel in ['seq','par']:
    g=collections.defaultdict(list)
    for r in rows:
        m=re.search(r'cp(\d+)'+sel,r['id'])
        if m: g[m.group(1)].append(r)
    for rep,lst in sorted(g.items()):
        F=lambda k:[float(r[k]) for r in lst]
        hold=[float(r['saved'])-float(r['locked']) for r in lst]
        ens=[float(r['ensure'])-float(r['locked']) for r in lst]
        ep=[float(r['endpoint'])-float(r['policy']) for r in lst]
        lw=[float(r['locked'])-float(r['plumbing']) for r in lst]
        pre=F('plumbing')
        e0=min(int(r['epoch']) for r in lst); e1=max(int(r['epoch'])/1000+float(r['end']) for r in lst)
        dur=e1-e0/1000
        print(f"{sel} rep{rep}: span {dur:.0f}ms holdsum {sum(hold):.0f} hold p50 {st.median(hold):.1f} max {max(hold):.1f} | ensure p50 {st.median(ens):.1f} ep p50 {st.median(ep):.1f} other {st.median([h-a-b for h,a,b in zip(hold,ens,ep)]):.1f} | lockwait p50 {st.median(lw):.1f} max {max(lw):.1f} | pre p50 {st.median(pre):.1f} | inproc p50 {st.median(F('end')):.1f} max {max(F('end')):.1f}")
