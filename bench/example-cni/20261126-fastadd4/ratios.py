import json,sys,glob,statistics as st,os
# args: dirs grouped as label=glob
for arg in sys.argv[1:]:
    label,pat=arg.split('=',1)
    rat={k:[] for k in ['seq_add_p50_ms','seq_del_p50_ms','par_add_p99_ms','par_add_p50_ms','par_del_p99_ms']}
    ab={k:{'reference':[],'ebpf':[]} for k in rat}
    loads=[]
    for f in sorted(glob.glob(pat+'/results.json')):
        d=json.load(open(f))
        loads.append((d['env']['loadBefore']['load1'],d['env']['loadAfter']['load1']))
        by={}
        for s in d['samples']:
            by.setdefault(s['rep'],{})[s['path']]=s['metrics']
        for rep,m in sorted(by.items()):
            if 'reference' in m and 'ebpf' in m:
                for k in rat:
                    rat[k].append(m['ebpf'][k]/m['reference'][k])
                    ab[k]['reference'].append(m['reference'][k]); ab[k]['ebpf'].append(m['ebpf'][k])
    n=len(rat['par_add_p99_ms'])
    print(f"{label}: runs {len(loads)} samples {n} load1 {min(min(l) for l in loads):.1f}-{max(max(l) for l in loads):.1f}")
    for k,v in rat.items():
        print(f"  {k}: median ratio {st.median(v):.2f}  (ms ref {st.median(ab[k]['reference']):.1f} ebpf {st.median(ab[k]['ebpf']):.1f})  per-rep: {' '.join('%.2f'%x for x in v)}")
