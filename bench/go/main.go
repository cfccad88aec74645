// Command gobench measures golang.org/x/sync/singleflight the way
// core_bench measures the C core, and prints the same kind of lines:
// "go <name> <value>", each the median of several rounds.
//
//	gobench [scale]
package main

import (
	"fmt"
	"os"
	"runtime"
	"sort"
	"strconv"
	"sync"
	"time"

	"golang.org/x/sync/singleflight"
)

const (
	rounds = 5
	nkeys  = 1024
)

var scale = 1.0

func scaled(n int) int {
	s := int(float64(n) * scale)
	if s < 1 {
		return 1
	}
	return s
}

func median(v []float64) float64 {
	sort.Float64s(v)
	n := len(v)
	if n%2 == 1 {
		return v[n/2]
	}
	return (v[n/2-1] + v[n/2]) / 2
}

var sink int64

//go:noinline
func work() (interface{}, error) {
	sink++
	return nil, nil
}

// Do on one key, one goroutine, nobody waiting: ns per call.
func benchDo(n int) float64 {
	var g singleflight.Group
	for i := 0; i < 1000; i++ {
		g.Do("key", work)
	}
	t0 := time.Now()
	for i := 0; i < n; i++ {
		g.Do("key", work)
	}
	return float64(time.Since(t0).Nanoseconds()) / float64(n)
}

// Two goroutines, ops calls each, on 1024 keys or on one: total calls/s
// and the executions. Each goroutine counts the runs of its own fn.
func benchTwo(ops int, sameKey bool, keys []string) (float64, int64) {
	var g singleflight.Group
	var wg, ready sync.WaitGroup
	var execs [2]int64
	start := make(chan struct{})
	for w := 0; w < 2; w++ {
		wg.Add(1)
		ready.Add(1)
		go func(id int) {
			defer wg.Done()
			k := id * (nkeys / 2)
			var n int64
			fn := func() (interface{}, error) {
				n++
				return nil, nil
			}
			defer func() { execs[id] = n }()
			ready.Done()
			<-start
			for i := 0; i < ops; i++ {
				key := "key"
				if !sameKey {
					key = keys[k]
				}
				g.Do(key, fn)
				k = (k + 1) & (nkeys - 1)
			}
		}(w)
	}
	ready.Wait()
	t0 := time.Now()
	close(start)
	wg.Wait()
	return float64(2*ops) / time.Since(t0).Seconds(), execs[0] + execs[1]
}

func main() {
	if len(os.Args) > 1 {
		s, err := strconv.ParseFloat(os.Args[1], 64)
		if err != nil || !(s > 0) {
			fmt.Fprintln(os.Stderr, "gobench: scale must be a positive number")
			os.Exit(1)
		}
		scale = s
	}
	runtime.GOMAXPROCS(2)
	keys := make([]string, nkeys)
	for i := range keys {
		keys[i] = "key:" + strconv.Itoa(i)
	}

	v := make([]float64, rounds)
	for r := range v {
		v[r] = benchDo(scaled(5000000))
	}
	fmt.Printf("go do_ns %.2f\n", median(v))

	par := make([]float64, rounds)
	same := make([]float64, rounds)
	se := make([]float64, rounds)
	for r := 0; r < rounds; r++ {
		n := scaled(2000000)
		par[r], _ = benchTwo(n, false, keys)
		var execs int64
		same[r], execs = benchTwo(n, true, keys)
		se[r] = 100 * float64(execs) / float64(2*n)
	}
	fmt.Printf("go par_ops %.0f\n", median(par))
	fmt.Printf("go same_ops %.0f\n", median(same))
	fmt.Printf("go same_execs %.2f\n", median(se))
}
